package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"math"
	"reflect"
	"strconv"
	"testing"

	"github.com/bootagent/bootagent/internal/testenv"
)

// FuzzApplyUserData feeds arbitrary user-data to the decoder: it must never
// panic, every refusal must be an ErrInvalid, and whatever it accepts must
// validate, marshal and carry only finite numbers. A byte-order mark in
// front must change nothing.
func FuzzApplyUserData(f *testing.F) {
	for _, seed := range [][]byte{
		[]byte("hostname=web01\ndomain=example.internal\n"),
		[]byte(`{"hostname":"web01","chef_run_list":["role[web]"],"chef_initial_attributes":{"a":[1,{"b":null}]}}`),
		[]byte("#cloud-config\nfqdn: a.b\nchef:\n  run_list: [x]\nbootagent:\n  imds:\n    token_ttl: 1h\n"),
		[]byte(mimeUserData),
		testenv.Gzip(f, mimeUserData),
		nestedMIME(3),
		[]byte("#!/bin/sh\n"),
		[]byte(bom + "hostname=web01\n"),
		[]byte(bom + `{"hostname":"web01"}`),
		[]byte(bom + "#cloud-config\nhostname: web01\n"),
		[]byte("Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/cloud-config\n\n" + bom + "#cloud-config\nhostname: a\n--b--\n"),
		[]byte("{\"hostname\":\"a\",\n\"hostname\":\"b\"}"),
		[]byte(`{"chef_initial_attributes":{"a":{"b":1,"b":2}}}`),
		[]byte("chef_initial_attributes={\"a\":1,\"a\":2}\n"),
		[]byte("#cloud-config\nhostname: a\nhostname: b\nchef:\n  run_list: [x]\n  run_list: [y]\n"),
		[]byte("#cloud-config\nbootagent:\n  chef: {interval: 10m}\n  chef: {splay: 1m}\n"),
		[]byte("#cloud-config\nx: &b {hostname: a, fqdn: a.b}\n<<: *b\nhostname: a\n"),
		[]byte("#cloud-config\nx: &a {environment: p}\ny: &b {node_name: n}\nchef:\n  <<: [*a, *b]\n  initial_attributes: {<<: *a, k: 1}\nbootagent:\n  chef:\n    <<: {interval: 10m}\n"),
		[]byte(`{"chef_initial_attributes":{"a":1e999,"b":-1E400,"c":1e-999}}`),
		[]byte("#cloud-config\nchef:\n  initial_attributes: {a: .inf, b: .NaN, c: 1e999, d: 1.0e+999, e: '1e999'}\n"),
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, _, err := ApplyUserData(Default(), data)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("refusal is not ErrInvalid: %v", err)
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("accepted user-data gives an invalid config: %v", err)
		}
		if _, err := json.Marshal(cfg); err != nil {
			t.Fatalf("accepted user-data does not marshal: %v", err)
		}
		if path, ok := nonFinite(map[string]any(cfg.Chef.InitialAttributes), "chef.initial_attributes"); ok {
			t.Fatalf("accepted user-data gives %s a number that is not finite", path)
		}
	})
}

// FuzzUserDataByteOrderMark checks that a byte-order mark in front of
// user-data changes nothing: the same settings, sources and notes, or the
// same refusal.
func FuzzUserDataByteOrderMark(f *testing.F) {
	for _, seed := range []string{"hostname=web01\n", `{"hostname":"web01"}`, "#cloud-config\nhostname: web01\n", mimeUserData, "{\"a\":1,\n\"a\":2}", "  \n", "#!/bin/sh\n"} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if bytes.HasPrefix(data, utf8BOM) || len(data)+len(utf8BOM) > MaxUserDataSize {
			return // only one mark is dropped; and the size limit counts it
		}
		cfg, info, err := ApplyUserData(Default(), data)
		bcfg, binfo, berr := ApplyUserData(Default(), append([]byte(bom), data...))
		if (err == nil) != (berr == nil) || err != nil && err.Error() != berr.Error() {
			t.Fatalf("without a mark: %v\nwith one: %v", err, berr)
		}
		if !reflect.DeepEqual(cfg, bcfg) || !reflect.DeepEqual(info, binfo) {
			t.Fatalf("without a mark: %+v %+v\nwith one: %+v %+v", cfg, info, bcfg, binfo)
		}
	})
}

// nonFinite finds a number in v, a decoded JSON value at path, that is not
// finite, as JSON readers take it.
func nonFinite(v any, path string) (string, bool) {
	switch t := v.(type) {
	case map[string]any:
		for k, e := range t {
			if p, ok := nonFinite(e, path+"."+k); ok {
				return p, true
			}
		}
	case []any:
		for _, e := range t {
			if p, ok := nonFinite(e, path+"[]"); ok {
				return p, true
			}
		}
	case float64:
		return path, math.IsInf(t, 0) || math.IsNaN(t)
	case json.Number:
		f, _ := strconv.ParseFloat(t.String(), 64)
		return path, math.IsInf(f, 0)
	}
	return "", false
}

// FuzzParse feeds arbitrary config files to the parser.
func FuzzParse(f *testing.F) {
	f.Add([]byte("imds:\n  token_ttl: 1h\nhostname:\n  domain: x\nchef:\n  initial_attributes: {a: [1, {b: c}]}\n"))
	f.Add([]byte("chef:\n  run_list: ['role[a]']\n  interval: 1m\n"))
	f.Add([]byte("chef:\n  initial_attributes: {a: .inf, b: 1e999, c: '1e999', d: {<<: {e: 1}, e: 2}}\n"))
	f.Add([]byte("chef:\n  initial_attributes:\n    a: 1\n    a: 2\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(data, "fuzz")
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("refusal is not ErrInvalid: %v", err)
			}
			return
		}
		if _, err := json.Marshal(cfg); err != nil {
			t.Fatalf("accepted config does not marshal: %v", err)
		}
		if path, ok := nonFinite(map[string]any(cfg.Chef.InitialAttributes), "chef.initial_attributes"); ok {
			t.Fatalf("accepted config gives %s a number that is not finite", path)
		}
	})
}
