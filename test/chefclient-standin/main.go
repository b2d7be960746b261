// Command chefclient-standin is a STAND-IN for Chef Infra Client, which
// cannot be installed from the package registries the tests can reach. It
// behaves like chef-client where chef-client meets bootagent, and nowhere
// else:
//
//   - it reads the client.rb bootagent wrote (-c) and, when given, the
//     first-boot JSON (-j);
//   - it signs requests with client.pem against the real Chef server,
//     fetches its node, applies the first-boot run list (or policy) and
//     attributes, adds automatic attributes, and saves the node;
//   - it retries an answer of 500 or above http_retry_count times (5 unless
//     client.rb says otherwise) after 1+2^n+rand(2^n) seconds, ignoring
//     Retry-After, and fails the run on a 429, as chef-client's Chef::HTTP
//     does;
//   - it exits 3 on SIGTERM and 2 on SIGINT, as chef-client does (RFC 062).
//
// Flags of its own, for tests: --exit CODE (the code to end with),
// --sleep DURATION (how long the "converge" takes), --sleep-file FILE (read
// that duration from FILE when it exists, so a test can make the next runs
// slow without touching the command line), --record FILE (append a JSON
// line describing the run).
package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	gochef "github.com/go-chef/chef"
)

func main() {
	os.Exit(run())
}

func run() int {
	configPath := flag.String("c", "/etc/chef/client.rb", "client.rb")
	jsonPath := flag.String("j", "", "first-boot JSON")
	exitCode := flag.Int("exit", 0, "stand-in: exit code to end with")
	sleep := flag.Duration("sleep", 0, "stand-in: how long the converge takes")
	sleepFile := flag.String("sleep-file", "", "stand-in: read --sleep from this file when it exists")
	record := flag.String("record", "", "stand-in: append a JSON line about the run to this file")
	flag.Parse()

	fmt.Println("Starting Chef Infra Client (bootagent's stand-in; not the real chef-client)")
	if data, err := os.ReadFile(*sleepFile); *sleepFile != "" && err == nil {
		d, err := time.ParseDuration(strings.TrimSpace(string(data)))
		if err != nil {
			fmt.Fprintf(os.Stderr, "FATAL: %s: %v\n", *sleepFile, err)
			return 1
		}
		*sleep = d
	}
	settings, err := readClientRB(*configPath)
	if err != nil {
		fmt.Fprintf(os.Stderr, "FATAL: %v\n", err)
		return 43 // CONFIG_FAILURE
	}
	node, err := converge(settings, *jsonPath)
	if err != nil {
		fmt.Fprintf(os.Stderr, "FATAL: %v\n", err)
		return 1
	}
	fmt.Printf("Run List is %v\n", node.RunList)

	if *record != "" {
		if err := appendRecord(*record, settings, node, *jsonPath); err != nil {
			fmt.Fprintf(os.Stderr, "FATAL: record: %v\n", err)
			return 1
		}
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-time.After(*sleep):
	case s := <-sigs:
		fmt.Printf("received %v, exiting\n", s)
		if s == syscall.SIGINT {
			return 2
		}
		return 3
	}
	fmt.Println("Chef Infra Client finished (stand-in)")
	return *exitCode
}

// readClientRB reads the "setting 'literal'" lines bootagent writes, with
// Ruby's single-quote rules, and symbols or constants as they are.
func readClientRB(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	settings := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, value, ok := strings.Cut(line, " ")
		if !ok {
			return nil, fmt.Errorf("%s line %d: not `setting value`", path, n)
		}
		value = strings.TrimSpace(value)
		if strings.HasPrefix(value, "'") {
			if value, ok = unquote(value); !ok {
				return nil, fmt.Errorf("%s line %d: bad string literal", path, n)
			}
		}
		settings[key] = value
	}
	for _, k := range []string{"chef_server_url", "node_name", "client_key"} {
		if settings[k] == "" {
			return nil, fmt.Errorf("%s: no %s", path, k)
		}
	}
	return settings, sc.Err()
}

func unquote(lit string) (string, bool) {
	if len(lit) < 2 || lit[len(lit)-1] != '\'' {
		return "", false
	}
	var b strings.Builder
	body := lit[1 : len(lit)-1]
	for i := 0; i < len(body); i++ {
		if body[i] == '\\' && i+1 < len(body) && (body[i+1] == '\\' || body[i+1] == '\'') {
			i++
		}
		b.WriteByte(body[i])
	}
	return b.String(), true
}

func converge(s map[string]string, jsonPath string) (gochef.Node, error) {
	key, err := os.ReadFile(s["client_key"])
	if err != nil {
		return gochef.Node{}, fmt.Errorf("client key: %w", err)
	}
	tlsConfig := &tls.Config{InsecureSkipVerify: s["ssl_verify_mode"] == ":verify_none"} //nolint:gosec // Mirrors client.rb.
	if ca := s["ssl_ca_file"]; ca != "" {
		pemData, err := os.ReadFile(ca)
		if err != nil {
			return gochef.Node{}, err
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pemData)
		tlsConfig.RootCAs = pool
	}
	retryCount := 5
	if v := s["http_retry_count"]; v != "" {
		if retryCount, err = strconv.Atoi(v); err != nil {
			return gochef.Node{}, fmt.Errorf("http_retry_count %q: %w", v, err)
		}
	}
	base := s["chef_server_url"]
	if !strings.HasSuffix(base, "/") {
		base += "/"
	}
	transport := &http.Transport{TLSClientConfig: tlsConfig}
	c, err := gochef.NewClient(&gochef.Config{
		Name: s["node_name"], Key: string(key), BaseURL: base,
		AuthenticationVersion: s["authentication_protocol_version"],
		Client: &http.Client{
			Transport: retrying{next: transport, count: retryCount},
			Timeout:   5 * time.Minute,
		},
	})
	if err != nil {
		return gochef.Node{}, err
	}
	node, err := c.Nodes.Get(s["node_name"])
	if err != nil {
		return gochef.Node{}, fmt.Errorf("get node %s: %w", s["node_name"], err)
	}
	if jsonPath != "" {
		if err := applyFirstBoot(&node, jsonPath); err != nil {
			return gochef.Node{}, err
		}
	}
	if node.AutomaticAttributes == nil {
		node.AutomaticAttributes = map[string]any{}
	}
	host, _ := os.Hostname()
	node.AutomaticAttributes["fqdn"] = host
	node.AutomaticAttributes["ohai_time"] = float64(time.Now().Unix())
	node.AutomaticAttributes["chef_client_standin"] = true
	if env := s["environment"]; env != "" {
		node.Environment = env
	}
	if _, err := c.Nodes.Put(node); err != nil {
		return gochef.Node{}, fmt.Errorf("save node: %w", err)
	}
	return node, nil
}

// retrying retries server errors the way chef-client does.
type retrying struct {
	next  http.RoundTripper
	count int
}

func (r retrying) RoundTrip(req *http.Request) (*http.Response, error) {
	for attempt := 1; ; attempt++ {
		res, err := r.next.RoundTrip(req)
		if err != nil || res.StatusCode < 500 || attempt > r.count || req.GetBody == nil && req.Body != nil {
			return res, err
		}
		_, _ = io.Copy(io.Discard, res.Body)
		res.Body.Close()
		wait := time.Duration(1+1<<attempt+rand.IntN(1<<attempt)) * time.Second
		fmt.Printf("WARN: Server returned error %d for %s, retrying %d/%d in %s\n", res.StatusCode, req.URL, attempt, r.count, wait)
		select {
		case <-req.Context().Done():
			return nil, req.Context().Err()
		case <-time.After(wait):
		}
		again := req.Clone(req.Context())
		if req.GetBody != nil {
			if again.Body, err = req.GetBody(); err != nil {
				return nil, err
			}
		}
		req = again
	}
}

func applyFirstBoot(node *gochef.Node, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var doc map[string]any
	if err := json.Unmarshal(data, &doc); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if node.NormalAttributes == nil {
		node.NormalAttributes = map[string]any{}
	}
	for k, v := range doc {
		switch k {
		case "run_list":
			items, ok := v.([]any)
			if !ok {
				return errors.New("run_list is not a list")
			}
			node.RunList = node.RunList[:0]
			for _, it := range items {
				node.RunList = append(node.RunList, fmt.Sprint(it))
			}
		case "policy_name":
			node.PolicyName = fmt.Sprint(v)
		case "policy_group":
			node.PolicyGroup = fmt.Sprint(v)
		default:
			node.NormalAttributes[k] = v
		}
	}
	return nil
}

// digest is the SHA-256 of s in hex, or "" for an empty s.
func digest(s string) string {
	if s == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

func appendRecord(path string, s map[string]string, node gochef.Node, jsonPath string) error {
	rec := map[string]any{
		"time":          time.Now().UTC().Format(time.RFC3339Nano),
		"pid":           os.Getpid(),
		"args":          os.Args[1:],
		"first_boot":    jsonPath,
		"node_name":     s["node_name"],
		"run_list":      node.RunList,
		"invocation_id": os.Getenv("INVOCATION_ID"),
		// A digest, so that a test can tell the key arrived without the
		// record holding it.
		"license_key_sha256": digest(os.Getenv("CHEF_LICENSE_KEY")),
	}
	line, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(append(line, '\n')); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
