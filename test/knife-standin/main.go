// Command knife-standin is a STAND-IN for the few knife commands the demo
// and the boot test use to look at the Chef server as an operator would:
// `node show NAME`, `node list` and `client list`, printed as JSON, and
// `upload REPO`, which uploads a chef-repo's environments, roles and
// cookbooks as `knife upload` does. knife itself cannot be installed from
// the package registries reachable here.
//
//	knife-standin -s URL -u admin -k admin.pem node show web01
//	knife-standin -s URL -u admin -k admin.pem upload test/chef-repo
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"slices"
	"strings"

	gochef "github.com/go-chef/chef"
)

func main() {
	server := flag.String("s", "", "Chef server URL")
	user := flag.String("u", "admin", "client or user to sign as")
	keyPath := flag.String("k", "", "its private key")
	flag.Parse()
	if err := run(*server, *user, *keyPath, flag.Args()); err != nil {
		fmt.Fprintf(os.Stderr, "knife-standin: %v\n", err)
		os.Exit(1)
	}
}

// is reports whether the command line starts with the words of a command.
func is(args []string, words ...string) bool {
	return len(args) >= len(words) && slices.Equal(args[:len(words)], words)
}

func run(server, user, keyPath string, args []string) error {
	key, err := os.ReadFile(keyPath)
	if err != nil {
		return err
	}
	if !strings.HasSuffix(server, "/") {
		server += "/"
	}
	c, err := gochef.NewClient(&gochef.Config{Name: user, Key: string(key), BaseURL: server, AuthenticationVersion: gochef.AuthVersion13})
	if err != nil {
		return err
	}
	var out any
	switch {
	case is(args, "node", "show"):
		if len(args) != 3 {
			return fmt.Errorf("usage: node show NAME")
		}
		n, err := c.Nodes.Get(args[2])
		if err != nil {
			return err
		}
		out = map[string]any{
			"name": n.Name, "chef_environment": n.Environment, "run_list": n.RunList,
			"policy_name": n.PolicyName, "policy_group": n.PolicyGroup,
			"normal": n.NormalAttributes, "fqdn": n.AutomaticAttributes["fqdn"], "ohai_time": n.AutomaticAttributes["ohai_time"],
			"cookbooks": n.AutomaticAttributes["cookbooks"],
		}
	case is(args, "node", "list"):
		out, err = c.Nodes.List()
	case is(args, "client", "list"):
		out, err = c.Clients.List()
	case is(args, "upload"):
		if len(args) != 2 {
			return fmt.Errorf("usage: upload REPO")
		}
		out, err = upload(c, args[1])
	default:
		return fmt.Errorf("usage: node show NAME | node list | client list | upload REPO")
	}
	if err != nil {
		return err
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}
