package config

import (
	"fmt"
	"math"
	"regexp"
	"strconv"

	"go.yaml.in/yaml/v3"
)

// keyError is a fault at one key inside a document. It keeps the line and
// the dotted key path apart, so that the caller can name both in its own
// terms; its Error text is shaped like the YAML library's ("line N: ..."),
// whose line cleanYAMLError drops where it would mislead.
type keyError struct {
	line   int    // line in the document, or 0 when not known
	path   string // dotted key path, e.g. chef.initial_attributes.app.port
	reason string
}

func (e *keyError) Error() string {
	if e.line > 0 {
		return fmt.Sprintf("line %d: %s: %s", e.line, e.path, e.reason)
	}
	return e.path + ": " + e.reason
}

// place names where the key is, within the document named where.
func (e *keyError) place(where string) string {
	if e.line > 0 {
		return fmt.Sprintf("%s line %d key %s", where, e.line, e.path)
	}
	return where + " key " + e.path
}

func givenTwice(path string, line, first int) *keyError {
	return &keyError{line: line, path: path, reason: fmt.Sprintf("given twice (first on line %d); keep one", first)}
}

// childPath joins a key to the path of the mapping that holds it.
func childPath(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// maxBlockNodes bounds the YAML nodes that one resolver copies or merges,
// every merge source counting as one as well as each key it brings; a real
// bootagent block or set of attributes has a few dozen, and a bound stops
// alias and merge bombs.
const maxBlockNodes = 10000

// resolver reads the YAML that bootagent acts on as PyYAML, and so
// cloud-init, reads it: an alias stands for what it names, and a merge key
// (<<) copies in the keys of a mapping, or of a list of mappings, that the
// mapping does not give itself, earlier mappings of a list winning over
// later ones (YAML 1.1's merge type). It is stricter than both in two
// ways: a key bootagent reads given twice in one mapping is an error, not
// the last one winning, and so is a number that is not finite.
type resolver struct {
	nodes int
	// reads, when set, says whether bootagent reads the key at a path;
	// one it does not read may be given twice, as PyYAML (and so
	// cloud-init, whose key it is) lets the last one win.
	reads func(path string) bool
}

func (r *resolver) count(n int) error {
	if r.nodes += n; r.nodes > maxBlockNodes {
		return fmt.Errorf("more than %d YAML nodes once aliases and merge keys are expanded (excessive aliasing)", maxBlockNodes)
	}
	return nil
}

// deref follows aliases to the node they name. The YAML parser refuses an
// anchor that contains an alias to itself, so the chain ends.
func deref(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	return n
}

func isMergeKey(k *yaml.Node) bool {
	return k.Kind == yaml.ScalarNode && k.ShortTag() == "!!merge"
}

// pairs returns the keys and values of mapping m, alternating as in a
// mapping's Content, with its merge keys applied: the merged keys first,
// then m's own. The values are m's nodes, not copies, and may be aliases.
// path names m in errors.
func (r *resolver) pairs(m *yaml.Node, path string) ([]*yaml.Node, error) {
	var (
		own    []*yaml.Node
		merged [][]*yaml.Node
		first  = map[string]int{} // own key -> its line
	)
	for i := 0; i+1 < len(m.Content); i += 2 {
		k, v := m.Content[i], m.Content[i+1]
		if k.Kind == yaml.ScalarNode && !isMergeKey(k) && (r.reads == nil || r.reads(childPath(path, k.Value))) {
			if line, dup := first[k.Value]; dup {
				return nil, givenTwice(childPath(path, k.Value), k.Line, line)
			}
			first[k.Value] = k.Line
		}
		if !isMergeKey(k) {
			own = append(own, k, v)
			continue
		}
		sources, err := mergeSources(v, childPath(path, k.Value), k.Line)
		if err != nil {
			return nil, err
		}
		for _, src := range sources {
			// The source itself counts, before it is expanded, and
			// then each key it brings: an empty mapping brings none,
			// and merged 20^7 times it must still cost something.
			if err := r.count(1); err != nil {
				return nil, err
			}
			p, err := r.pairs(src, path)
			if err != nil {
				return nil, err
			}
			if err := r.count(len(p) / 2); err != nil {
				return nil, err
			}
			merged = append(merged, p)
		}
	}
	if len(merged) == 0 {
		return own, nil
	}
	var out []*yaml.Node
	taken := first
	for _, p := range merged {
		for i := 0; i+1 < len(p); i += 2 {
			k := p[i]
			if k.Kind == yaml.ScalarNode {
				if _, ok := taken[k.Value]; ok {
					continue // m's own key, or an earlier merged one, wins
				}
				taken[k.Value] = k.Line
			}
			out = append(out, k, p[i+1])
		}
	}
	return append(out, own...), nil
}

// mergeSources returns the mappings that the value v of a merge key names.
func mergeSources(v *yaml.Node, path string, line int) ([]*yaml.Node, error) {
	wrong := &keyError{line: line, path: path, reason: "a merge key takes a mapping or a list of mappings"}
	switch v = deref(v); v.Kind {
	case yaml.MappingNode:
		return []*yaml.Node{v}, nil
	case yaml.SequenceNode:
		out := make([]*yaml.Node, len(v.Content))
		for i, c := range v.Content {
			if out[i] = deref(c); out[i].Kind != yaml.MappingNode {
				return nil, wrong
			}
		}
		return out, nil
	}
	return nil, wrong
}

// node returns a copy of n with every alias replaced by what it names and
// every merge key applied, so that it can be decoded or marshalled on its
// own; path names n in errors.
func (r *resolver) node(n *yaml.Node, path string) (*yaml.Node, error) {
	if err := r.count(1); err != nil {
		return nil, err
	}
	n = deref(n)
	out := *n
	out.Anchor = ""
	out.Content = nil
	switch n.Kind {
	case yaml.MappingNode:
		p, err := r.pairs(n, path)
		if err != nil {
			return nil, err
		}
		out.Content = make([]*yaml.Node, len(p))
		for i := 0; i+1 < len(p); i += 2 {
			k := p[i]
			if out.Content[i], err = r.key(k, path); err != nil {
				return nil, err
			}
			if out.Content[i+1], err = r.node(p[i+1], childPath(path, k.Value)); err != nil {
				return nil, err
			}
		}
	case yaml.SequenceNode:
		out.Content = make([]*yaml.Node, len(n.Content))
		for i, c := range n.Content {
			e, err := r.node(c, fmt.Sprintf("%s[%d]", path, i))
			if err != nil {
				return nil, err
			}
			out.Content[i] = e
		}
	case yaml.ScalarNode:
		if err := checkFinite(n, path); err != nil {
			return nil, err
		}
	}
	return &out, nil
}

// key copies a mapping key. A key is not checked as a number: it names a
// value, and one that is not a string is refused where strings are wanted.
func (r *resolver) key(k *yaml.Node, path string) (*yaml.Node, error) {
	if k = deref(k); k.Kind != yaml.ScalarNode {
		return r.node(k, path)
	}
	out := *k
	out.Anchor = ""
	return &out, nil
}

// numberRE matches what the YAML library reads as a float when it fits
// one.
var numberRE = regexp.MustCompile(`^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$`)

// checkFinite refuses a number that is not finite: .inf and .nan, which
// JSON cannot carry (first-boot.json and the Chef node are JSON), and a
// number too large for a float, such as 1e999. The YAML library leaves that
// one a string, but it was written as a number, and PyYAML reads 1.0e+999
// as infinity, which Ruby's JSON would make of it too; so it is refused
// rather than guessed at, tagged !!float or not. Quoted, any of them is
// text.
func checkFinite(n *yaml.Node, path string) error {
	notFinite := &keyError{line: n.Line, path: path, reason: fmt.Sprintf("%s is not a finite number (JSON cannot carry it); give a finite one, or quote it if it is text", n.Value)}
	switch n.ShortTag() {
	case "!!float":
		var f float64
		if err := n.Decode(&f); err != nil {
			// The YAML library decodes !!float 1e999 as the string it
			// could not fit in a float, and then fails to make a float
			// of it, at the line of the mapping. It is the untagged
			// 1e999 again, and refused as that is, at its own line.
			if f, _ := strconv.ParseFloat(n.Value, 64); math.IsInf(f, 0) {
				return notFinite
			}
			return &keyError{line: n.Line, path: path, reason: fmt.Sprintf("%q is tagged !!float but is not a number; give a number, or drop the tag if it is text", n.Value)}
		}
		if math.IsInf(f, 0) || math.IsNaN(f) {
			return notFinite
		}
	case "!!str":
		if n.Style != 0 || !numberRE.MatchString(n.Value) {
			return nil // quoted or tagged: text
		}
		if f, _ := strconv.ParseFloat(n.Value, 64); math.IsInf(f, 0) {
			return notFinite
		}
	}
	return nil
}
