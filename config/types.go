package config

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"time"

	"go.yaml.in/yaml/v3"
)

// Duration is a time.Duration written as "30m" in YAML and JSON.
type Duration time.Duration

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// String formats d like time.Duration does.
func (d Duration) String() string { return time.Duration(d).String() }

// UnmarshalYAML accepts a Go duration string, or 0.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("line %d: want a duration such as 30m", n.Line)
	}
	v, err := parseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes d as a duration string.
func (d Duration) MarshalYAML() (any, error) { return d.String(), nil }

// MarshalJSON writes d as a duration string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

func parseDuration(s string) (time.Duration, error) {
	if s == "0" {
		return 0, nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("%q is not a duration such as 90s, 30m or 6h", s)
	}
	return v, nil
}

// Object is a JSON object: Chef attributes. Every map in it has string keys
// and every value is one JSON can carry, so it always marshals.
type Object map[string]any

// attributesKey is the one key that holds an Object, in the config file
// and in cloud-init's chef block alike; errors name paths under it.
const attributesKey = "chef.initial_attributes"

// UnmarshalYAML decodes a mapping, with its aliases and merge keys, and
// checks that JSON can carry it.
func (o *Object) UnmarshalYAML(n *yaml.Node) error {
	resolved, err := new(resolver).node(n, attributesKey)
	if err != nil {
		return err
	}
	var raw any
	if err := resolved.Decode(&raw); err != nil {
		return err
	}
	obj, err := toObject(raw, attributesKey)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*o = obj
	return nil
}

func (o Object) clone() Object {
	if o == nil {
		return nil
	}
	v, _ := cloneJSON(map[string]any(o)).(map[string]any)
	return v
}

func cloneJSON(v any) any {
	switch t := v.(type) {
	case map[string]any:
		out := make(map[string]any, len(t))
		for k, e := range t {
			out[k] = cloneJSON(e)
		}
		return out
	case []any:
		out := make([]any, len(t))
		for i, e := range t {
			out[i] = cloneJSON(e)
		}
		return out
	default:
		return v
	}
}

// maxAttributeDepth bounds nesting in attributes; Chef attributes are rarely
// deeper than five, and a bound keeps recursion away from hostile input.
const maxAttributeDepth = 32

// toObject checks that v is a mapping with string keys all the way down and
// converts YAML's types to JSON's. path names v in errors.
func toObject(v any, path string) (Object, error) {
	if v == nil {
		return nil, nil
	}
	out, err := toJSONValue(v, path, 0)
	if err != nil {
		return nil, err
	}
	m, ok := out.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("want a mapping of attributes, got %s", jsonKind(out))
	}
	return m, nil
}

func toJSONValue(v any, path string, depth int) (any, error) {
	if depth > maxAttributeDepth {
		return nil, fmt.Errorf("attributes nest deeper than %d levels at %s", maxAttributeDepth, path)
	}
	switch t := v.(type) {
	case nil, bool, string:
		return t, nil
	case json.Number:
		// A number beyond what a float holds, such as 1e999, is
		// Infinity to Ruby's JSON, which reads first-boot.json, and to
		// most other readers of the node, so it is refused here.
		if f, _ := strconv.ParseFloat(t.String(), 64); math.IsInf(f, 0) {
			return nil, fmt.Errorf("%s is %s, not a finite number; give a finite one, or quote it if it is text", orTop(path), t)
		}
		return t, nil
	case float64:
		if math.IsNaN(t) || math.IsInf(t, 0) {
			return nil, fmt.Errorf("value at %s is %v, which JSON cannot carry", orTop(path), t)
		}
		return t, nil
	case int:
		return t, nil
	case int64:
		return t, nil
	case uint64:
		return t, nil
	case map[string]any:
		out := make(map[string]any, len(t))
		for k, e := range t {
			c, err := toJSONValue(e, childPath(path, k), depth+1)
			if err != nil {
				return nil, err
			}
			out[k] = c
		}
		return out, nil
	case map[any]any:
		out := make(map[string]any, len(t))
		for k, e := range t {
			ks, ok := k.(string)
			if !ok {
				return nil, fmt.Errorf("attribute key %v at %s is not a string", k, orTop(path))
			}
			c, err := toJSONValue(e, childPath(path, ks), depth+1)
			if err != nil {
				return nil, err
			}
			out[ks] = c
		}
		return out, nil
	case []any:
		out := make([]any, len(t))
		for i, e := range t {
			c, err := toJSONValue(e, fmt.Sprintf("%s[%d]", path, i), depth+1)
			if err != nil {
				return nil, err
			}
			out[i] = c
		}
		return out, nil
	default:
		return nil, fmt.Errorf("value at %s has type %T, which JSON cannot carry", orTop(path), v)
	}
}

func orTop(path string) string {
	if path == "" {
		return "the top"
	}
	return path
}

func jsonKind(v any) string {
	switch v.(type) {
	case map[string]any:
		return "a mapping"
	case []any:
		return "a list"
	case string:
		return "a string"
	case nil:
		return "nothing"
	default:
		return fmt.Sprintf("%T", v)
	}
}
