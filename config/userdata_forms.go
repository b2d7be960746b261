package config

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strings"
	"unicode/utf8"

	"go.yaml.in/yaml/v3"
)

// valueKind is the type a flat user-data key takes.
type valueKind int

const (
	kindString valueKind = iota
	kindBool
	kindList
	kindObject
)

// flatKeys are the keys of key=value and JSON user-data, and the config key
// each one sets. hostname, domain and fqdn are resolved together first.
var flatKeys = map[string]struct {
	key  string
	kind valueKind
}{
	"hostname":                {"hostname.name", kindString},
	"domain":                  {"hostname.domain", kindString},
	"fqdn":                    {"hostname.name", kindString},
	"prefer_fqdn":             {"hostname.prefer_fqdn", kindBool},
	"manage_etc_hosts":        {"hostname.manage_etc_hosts", kindBool},
	"preserve_hostname":       {"hostname.preserve", kindBool},
	"chef_server_url":         {"chef.server_url", kindString},
	"chef_node_name":          {"chef.node_name", kindString},
	"chef_environment":        {"chef.environment", kindString},
	"chef_run_list":           {"chef.run_list", kindList},
	"chef_policy_name":        {"chef.policy_name", kindString},
	"chef_policy_group":       {"chef.policy_group", kindString},
	"chef_initial_attributes": {"chef.initial_attributes", kindObject},
	"chef_validation_name":    {"chef.validation_client_name", kindString},
	"imds_allow_users":        {"imds.allow_users", kindList},
}

func knownFlatKeys() string {
	keys := make([]string, 0, len(flatKeys))
	for k := range flatKeys {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return strings.Join(keys, ", ")
}

// flatDoc collects the settings of one key=value or JSON document.
type flatDoc struct {
	names naming
	as    []assignment
}

// add records key (already known to be a flat key) with its parsed value.
func (f *flatDoc) add(name string, v any, source string) {
	switch name {
	case "hostname":
		f.names.hostname = &sourced{v.(string), source}
	case "domain":
		f.names.domain = &sourced{v.(string), source}
	case "fqdn":
		f.names.fqdn = &sourced{v.(string), source}
	default:
		f.as = append(f.as, assignment{flatKeys[name].key, v, source})
	}
}

func (d *decoder) applyFlat(f *flatDoc) error {
	names, err := f.names.resolve()
	if err != nil {
		return err
	}
	d.apply(append(names, f.as...))
	return nil
}

// decodeKeyValue reads lines of key=value, with # comments and blank lines.
// A value may be wrapped in single or double quotes, as in shell files.
func (d *decoder) decodeKeyValue(data []byte, where string) error {
	if !utf8.Valid(data) {
		return &InvalidError{Source: where, Reason: "not valid UTF-8"}
	}
	var doc flatDoc
	seen := map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), MaxUserDataSize)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		src := fmt.Sprintf("%s line %d", where, n)
		if !keyValueRE.MatchString(line) {
			return &InvalidError{Source: src, Reason: notKeyValue(line)}
		}
		k, v, _ := strings.Cut(line, "=")
		k = strings.ToLower(strings.TrimSpace(k))
		src += " key " + k
		if prev, dup := seen[k]; dup {
			return placeError(where, src, givenTwice(k, n, prev))
		}
		seen[k] = n
		spec, ok := flatKeys[k]
		if !ok {
			return &InvalidError{Source: src, Reason: fmt.Sprintf("unknown key %q (known: %s)", k, knownFlatKeys())}
		}
		val, err := parseFlatString(unquote(strings.TrimSpace(v)), spec.kind, k, n)
		if err != nil {
			return placeError(where, src, err)
		}
		doc.add(k, val, src)
	}
	if err := sc.Err(); err != nil {
		return &InvalidError{Source: where, Reason: err.Error()}
	}
	return d.applyFlat(&doc)
}

// keyMaterialRE matches a line that looks like part of a key or a
// certificate: PEM armour, or a run of base64 longer than any word of
// prose or host name (a PEM body line is 64 characters).
var keyMaterialRE = regexp.MustCompile(`-----(BEGIN|END) |[A-Za-z0-9+/=]{40,}`)

// notKeyValue says that line is not key=value, quoting its start unless it
// looks like part of a pasted key: the error goes to the journal and the
// console, which must never hold key material.
func notKeyValue(line string) string {
	if keyMaterialRE.MatchString(line) {
		return "not key=value (it looks like part of a key, not quoted)"
	}
	return fmt.Sprintf("%q is not key=value", truncate(line))
}

func unquote(v string) string {
	if len(v) >= 2 && (v[0] == '"' || v[0] == '\'') && v[len(v)-1] == v[0] {
		return v[1 : len(v)-1]
	}
	return v
}

func truncate(s string) string {
	const limit = 60
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}

// parseFlatString turns the value of key on a key=value line into the kind
// the key takes.
func parseFlatString(v string, kind valueKind, key string, line int) (any, error) {
	switch kind {
	case kindBool:
		return parseBool(v)
	case kindList:
		return splitList(v), nil
	case kindObject:
		if err := checkJSONKeys([]byte(v), key, line); err != nil {
			return nil, err
		}
		return parseJSONObject([]byte(v), key)
	default:
		return v, nil
	}
}

func parseBool(v string) (bool, error) {
	switch strings.ToLower(v) {
	case "true", "yes", "on", "1":
		return true, nil
	case "false", "no", "off", "0":
		return false, nil
	}
	return false, fmt.Errorf("%q is not true or false", v)
}

// splitList splits a comma-separated list, as chef-client's -r takes a run
// list: "role[web],recipe[base]".
func splitList(v string) []string {
	out := []string{}
	for _, item := range strings.Split(v, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

// parseJSONObject decodes the JSON object that is the value of the key at
// path; keys given twice are checked by the caller, which knows the lines.
func parseJSONObject(data []byte, path string) (Object, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("not a JSON object: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("text after the JSON object")
	}
	obj, err := toObject(v, path)
	if err != nil {
		return nil, err
	}
	if obj == nil {
		return Object{}, nil
	}
	return obj, nil
}

// placeError makes err, found at the key that src names, an InvalidError; a
// keyError names its own line and key within the document where.
func placeError(where, src string, err error) error {
	var ke *keyError
	if errors.As(err, &ke) {
		return &InvalidError{Source: ke.place(where), Reason: ke.reason}
	}
	return &InvalidError{Source: src, Reason: err.Error()}
}

// errStopWalk ends checkJSONKeys early, on what the decoder refuses anyway.
var errStopWalk = errors.New("stop")

// checkJSONKeys refuses a key given twice in one object of the JSON text
// data, at any depth, where encoding/json lets the last one win. path names
// the value data holds, and line is the line it starts on.
func checkJSONKeys(data []byte, path string, line int) error {
	w := jsonKeys{dec: json.NewDecoder(bytes.NewReader(data)), data: data, line: line}
	w.dec.UseNumber()
	if err := w.value(path, 0); !errors.Is(err, errStopWalk) {
		return err
	}
	return nil
}

// jsonKeys walks the tokens of a JSON text, counting lines as it goes.
type jsonKeys struct {
	dec  *json.Decoder
	data []byte
	off  int64 // how far lines are counted
	line int   // the line at off
}

func (w *jsonKeys) lineNow() int {
	off := w.dec.InputOffset()
	w.line += bytes.Count(w.data[w.off:off], []byte("\n"))
	w.off = off
	return w.line
}

func (w *jsonKeys) value(path string, depth int) error {
	tok, err := w.dec.Token()
	if err != nil || depth > maxAttributeDepth {
		return errStopWalk // a syntax error, or nesting toObject refuses
	}
	switch tok {
	case json.Delim('{'):
		first := map[string]int{}
		for w.dec.More() {
			tok, err := w.dec.Token()
			if err != nil {
				return errStopWalk
			}
			k, _ := tok.(string)
			line, kpath := w.lineNow(), childPath(path, k)
			if prev, dup := first[k]; dup {
				return givenTwice(kpath, line, prev)
			}
			first[k] = line
			if err := w.value(kpath, depth+1); err != nil {
				return err
			}
		}
	case json.Delim('['):
		for i := 0; w.dec.More(); i++ {
			if err := w.value(fmt.Sprintf("%s[%d]", path, i), depth+1); err != nil {
				return err
			}
		}
	default:
		return nil
	}
	if _, err := w.dec.Token(); err != nil { // the closing } or ]
		return errStopWalk
	}
	return nil
}

// decodeJSON reads a JSON object with the same keys as key=value user-data.
func (d *decoder) decodeJSON(data []byte, where string) error {
	if !utf8.Valid(data) {
		return &InvalidError{Source: where, Reason: "not valid UTF-8"}
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var top map[string]json.RawMessage
	if err := dec.Decode(&top); err != nil {
		return &InvalidError{Source: where, Reason: jsonError(data, err)}
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return &InvalidError{Source: where, Reason: "text after the JSON object; give exactly one object"}
	}
	if err := checkJSONKeys(data, "", 1); err != nil {
		return placeError(where, where, err)
	}
	keys := make([]string, 0, len(top))
	for k := range top {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var doc flatDoc
	for _, k := range keys {
		src := where + " key " + k
		spec, ok := flatKeys[k]
		if !ok {
			return &InvalidError{Source: src, Reason: fmt.Sprintf("unknown key %q (known: %s)", k, knownFlatKeys())}
		}
		val, err := parseJSONValue(top[k], spec.kind, k)
		if err != nil {
			return &InvalidError{Source: src, Reason: err.Error()}
		}
		doc.add(k, val, src)
	}
	return d.applyFlat(&doc)
}

// jsonError adds the line to a JSON syntax error.
func jsonError(data []byte, err error) string {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		line := 1 + bytes.Count(data[:min(int(se.Offset), len(data))], []byte("\n"))
		return fmt.Sprintf("line %d: %v", line, se)
	}
	return err.Error()
}

func parseJSONValue(raw json.RawMessage, kind valueKind, key string) (any, error) {
	switch kind {
	case kindBool:
		var b bool
		if err := json.Unmarshal(raw, &b); err == nil {
			return b, nil
		}
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, fmt.Errorf("%s is not true or false", raw)
		}
		return parseBool(s)
	case kindList:
		var list []string
		if err := json.Unmarshal(raw, &list); err == nil {
			return nonEmpty(list), nil
		}
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, errors.New("want a list of strings or a comma-separated string")
		}
		return splitList(s), nil
	case kindObject:
		return parseJSONObject(raw, key)
	default:
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, fmt.Errorf("want a string, got %s", truncate(string(raw)))
		}
		return s, nil
	}
}

func nonEmpty(list []string) []string {
	out := []string{}
	for _, s := range list {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}

// cloudChefKeys maps the keys of cloud-init's chef block that bootagent
// honours to config keys. Others (install_type, omnibus_url, ...) are
// cloud-init's business.
var cloudChefKeys = map[string]struct {
	key  string
	kind valueKind
}{
	"server_url":                  {"chef.server_url", kindString},
	"node_name":                   {"chef.node_name", kindString},
	"environment":                 {"chef.environment", kindString},
	"run_list":                    {"chef.run_list", kindList},
	"initial_attributes":          {"chef.initial_attributes", kindObject},
	"validation_name":             {"chef.validation_client_name", kindString},
	"validation_cert":             {"chef.validation_cert", kindString},
	"validation_key":              {"chef.validation_key", kindString},
	"client_key":                  {"chef.client_key", kindString},
	"policy_name":                 {"chef.policy_name", kindString},
	"policy_group":                {"chef.policy_group", kindString},
	"ssl_verify_mode":             {"chef.ssl_verify", kindBool},
	"delete_validation_post_exec": {"chef.delete_validation_key", kindBool},
	// chef-client's own settings, which cloud-init writes to client.rb.
	"chef_license":              {"chef.license", kindString},
	"encrypted_data_bag_secret": {"chef.encrypted_data_bag_secret", kindString},
	"log_level":                 {"chef.log_level", kindString},
	"file_cache_path":           {"chef.file_cache_path", kindString},
	"file_backup_path":          {"chef.file_backup_path", kindString},
	"pid_file":                  {"chef.pid_file", kindString},
	"firstboot_path":            {"chef.firstboot_path", kindString},
	"json_attribs":              {"chef.json_attribs", kindString},
	"show_time":                 {"chef.show_time", kindBool},
	"exec":                      {"chef.exec", kindBool},
}

// decodeCloudConfig reads the keys of a #cloud-config document that concern
// the host name and Chef, and the bootagent block; the rest is cloud-init's.
func (d *decoder) decodeCloudConfig(data []byte, where string) error {
	if !utf8.Valid(data) {
		return &InvalidError{Source: where, Reason: "not valid UTF-8"}
	}
	doc, err := singleDocument(data)
	if err != nil {
		return &InvalidError{Source: where, Reason: cleanYAMLError(err, true)}
	}
	if len(doc.Content) == 0 {
		return nil // Only comments: nothing asked.
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return &InvalidError{Source: where, Reason: fmt.Sprintf("line %d: want a mapping of keys", root.Line)}
	}
	// The top level and the chef block are resolved one level at a
	// time: the values bootagent does not read are cloud-init's, and
	// are not expanded.
	r := &resolver{reads: readsCloudConfigKey}
	top, err := r.pairs(root, "")
	if err != nil {
		return placeError(where, where, err)
	}
	var (
		names     naming
		as        []assignment
		bootagent *yaml.Node
		others    []string
	)
	for i := 0; i+1 < len(top); i += 2 {
		k, v := top[i], deref(top[i+1])
		src := fmt.Sprintf("%s line %d key %s", where, k.Line, k.Value)
		switch k.Value {
		case "hostname", "fqdn":
			s, err := scalarString(v)
			if err != nil {
				return &InvalidError{Source: src, Reason: err.Error()}
			}
			if k.Value == "fqdn" {
				names.fqdn = &sourced{s, src}
			} else {
				names.hostname = &sourced{s, src}
			}
		case "prefer_fqdn_over_hostname", "preserve_hostname":
			b, err := scalarBool(v)
			if err != nil {
				return &InvalidError{Source: src, Reason: err.Error()}
			}
			key := "hostname.prefer_fqdn"
			if k.Value == "preserve_hostname" {
				key = "hostname.preserve"
			}
			as = append(as, assignment{key, b, src})
		case "manage_etc_hosts":
			b, err := manageEtcHosts(v)
			if err != nil {
				return &InvalidError{Source: src, Reason: err.Error()}
			}
			as = append(as, assignment{"hostname.manage_etc_hosts", b, src})
		case "chef":
			chef, ignored, err := cloudChef(r, v, where)
			if err != nil {
				return err
			}
			as = append(as, chef...)
			if slices.Contains(ignored, "log_location") {
				ignored = slices.DeleteFunc(ignored, func(k string) bool { return k == "log_location" })
				d.ignore(fmt.Sprintf("%s: chef.log_location: bootagent writes log_location STDOUT, so that chef-client's output reaches the journal of its run's unit", where))
			}
			if len(ignored) > 0 {
				d.ignore(fmt.Sprintf("%s: chef keys for cloud-init only: %s", where, strings.Join(ignored, ", ")))
			}
		case "bootagent":
			bootagent = v
		default:
			others = appendUnique(others, k.Value)
		}
	}
	if len(others) > 0 {
		d.ignore(fmt.Sprintf("%s: keys left to cloud-init: %s", where, strings.Join(others, ", ")))
	}
	resolved, err := names.resolve()
	if err != nil {
		return err
	}
	d.apply(append(resolved, as...))
	if bootagent != nil {
		return d.applyBootagentBlock(bootagent, where+" bootagent block")
	}
	return nil
}

// readsCloudConfigKey reports whether bootagent reads the #cloud-config key
// at path (dotted, as "chef.run_list"), or something inside one it reads.
func readsCloudConfigKey(path string) bool {
	top, rest, _ := strings.Cut(path, ".")
	switch top {
	case "hostname", "fqdn", "prefer_fqdn_over_hostname", "preserve_hostname", "manage_etc_hosts", "bootagent":
		return true
	case "chef":
		key, _, _ := strings.Cut(rest, ".")
		_, ok := cloudChefKeys[key]
		return rest == "" || ok
	default:
		return false
	}
}

func cloudChef(r *resolver, n *yaml.Node, where string) ([]assignment, []string, error) {
	if n.Kind != yaml.MappingNode {
		return nil, nil, &InvalidError{Source: fmt.Sprintf("%s line %d key chef", where, n.Line), Reason: "want a mapping"}
	}
	chef, err := r.pairs(n, "chef")
	if err != nil {
		return nil, nil, placeError(where, where, err)
	}
	var (
		as      []assignment
		ignored []string
	)
	for i := 0; i+1 < len(chef); i += 2 {
		k, v := chef[i], deref(chef[i+1])
		src := fmt.Sprintf("%s line %d key chef.%s", where, k.Line, k.Value)
		spec, ok := cloudChefKeys[k.Value]
		if !ok {
			ignored = appendUnique(ignored, k.Value)
			continue
		}
		val, err := cloudChefValue(k.Value, v, spec.kind)
		if err != nil {
			return nil, nil, placeError(where, src, err)
		}
		if k.Value == "validation_cert" && val == "system" {
			// cloud-init's "system": the validator is already on disk
			// at validation_key.
			continue
		}
		as = append(as, assignment{spec.key, val, src})
	}
	return as, ignored, nil
}

func cloudChefValue(name string, v *yaml.Node, kind valueKind) (any, error) {
	switch {
	case name == "ssl_verify_mode":
		s, err := scalarString(v)
		if err != nil {
			return nil, err
		}
		switch strings.TrimPrefix(s, ":") {
		case "verify_peer":
			return true, nil
		case "verify_none":
			return false, nil
		}
		return nil, fmt.Errorf("%q is not :verify_peer or :verify_none", s)
	case name == "log_level":
		// cloud-init's examples write it as a Ruby symbol.
		s, err := scalarString(v)
		return strings.TrimPrefix(s, ":"), err
	case kind == kindBool:
		return scalarBool(v)
	case kind == kindList:
		if v.Kind == yaml.ScalarNode {
			return splitList(v.Value), nil
		}
		var list []string
		if err := v.Decode(&list); err != nil {
			return nil, fmt.Errorf("want a list of strings: %s", cleanYAMLError(err, true))
		}
		return nonEmpty(list), nil
	case kind == kindObject:
		var obj Object
		if err := v.Decode(&obj); err != nil {
			var ke *keyError
			if errors.As(err, &ke) {
				return nil, ke // placed by the caller, with its own line
			}
			return nil, errors.New(cleanYAMLError(err, true))
		}
		if obj == nil {
			obj = Object{}
		}
		return obj, nil
	default:
		return scalarString(v)
	}
}

func scalarString(n *yaml.Node) (string, error) {
	if n.Kind != yaml.ScalarNode || n.Tag == "!!null" {
		return "", fmt.Errorf("line %d: want a string", n.Line)
	}
	return n.Value, nil
}

func scalarBool(n *yaml.Node) (bool, error) {
	if n.Kind != yaml.ScalarNode {
		return false, fmt.Errorf("line %d: want true or false", n.Line)
	}
	b, err := parseBool(n.Value)
	if err != nil {
		return false, fmt.Errorf("line %d: %w", n.Line, err)
	}
	return b, nil
}

// manageEtcHosts reads cloud-init's manage_etc_hosts: a boolean, or
// "template" or "localhost", both of which ask for a managed entry.
func manageEtcHosts(n *yaml.Node) (bool, error) {
	if n.Kind == yaml.ScalarNode && (n.Value == "template" || n.Value == "localhost") {
		return true, nil
	}
	b, err := scalarBool(n)
	if err != nil {
		return false, fmt.Errorf("line %d: want true, false, template or localhost", n.Line)
	}
	return b, nil
}

// applyBootagentBlock decodes the bootagent block of a #cloud-config, which
// has the schema of the config file, strictly over the working config.
func (d *decoder) applyBootagentBlock(n *yaml.Node, where string) error {
	if n.Kind != yaml.MappingNode {
		return &InvalidError{Source: fmt.Sprintf("%s line %d", where, n.Line), Reason: "want a mapping with the config file's keys"}
	}
	// Resolved here, keys given twice and numbers that are not finite are
	// named with the lines of the user-data, which the YAML that is
	// marshalled for the strict decoder has lost.
	resolved, err := new(resolver).node(n, "")
	if err != nil {
		return placeError(where, where, err)
	}
	data, err := yaml.Marshal(resolved)
	if err != nil {
		return &InvalidError{Source: where, Reason: err.Error()}
	}
	if err := decodeStrict(data, &d.cfg, where, false); err != nil {
		return err
	}
	set := map[string]string{}
	recordLines(resolved, "", where, set)
	keys := make([]string, 0, len(set))
	for k := range set {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if !strings.Contains(k, ".") {
			continue // a section, not a setting
		}
		d.cfg.setSource(k, set[k])
		d.info.Keys = appendUnique(d.info.Keys, k)
	}
	return nil
}
