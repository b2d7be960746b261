default['base']['motd'] = 'Managed by Chef; bootstrapped by bootagent.'
