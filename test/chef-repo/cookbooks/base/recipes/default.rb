template '/etc/motd' do
  source 'motd.erb'
  mode '0644'
  variables(message: node['base']['motd'])
end

cookbook_file '/etc/issue.net' do
  source 'issue.net'
  mode '0644'
end
