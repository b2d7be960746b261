include_recipe 'base'

package 'nginx'
