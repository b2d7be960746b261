package config

import (
	"encoding/json"
	"errors"
	"testing"

	"github.com/bootagent/bootagent/internal/testenv"
)

// FuzzApplyUserData feeds arbitrary user-data to the decoder: it must never
// panic, every refusal must be an ErrInvalid, and whatever it accepts must
// validate and marshal.
func FuzzApplyUserData(f *testing.F) {
	for _, seed := range [][]byte{
		[]byte("hostname=web01\ndomain=example.internal\n"),
		[]byte(`{"hostname":"web01","chef_run_list":["role[web]"],"chef_initial_attributes":{"a":[1,{"b":null}]}}`),
		[]byte("#cloud-config\nfqdn: a.b\nchef:\n  run_list: [x]\nbootagent:\n  imds:\n    token_ttl: 1h\n"),
		[]byte(mimeUserData),
		testenv.Gzip(f, mimeUserData),
		nestedMIME(3),
		[]byte("#!/bin/sh\n"),
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
	})
}

// FuzzParse feeds arbitrary config files to the parser.
func FuzzParse(f *testing.F) {
	f.Add([]byte("imds:\n  token_ttl: 1h\nhostname:\n  domain: x\nchef:\n  initial_attributes: {a: [1, {b: c}]}\n"))
	f.Add([]byte("chef:\n  run_list: ['role[a]']\n  interval: 1m\n"))
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
	})
}
