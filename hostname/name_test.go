package hostname

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMake(t *testing.T) {
	tests := []struct {
		name, in, domain string
		want             Name
	}{
		{"a short name with a domain gets an FQDN", "web01", "example.internal", Name{"web01", "web01.example.internal"}},
		{"a short name without a domain has none", "web01", "", Name{"web01", ""}},
		{"a dotted name is already fully qualified", "web01.a.example", "example.internal", Name{"web01", "web01.a.example"}},
		{"upper case is lowered", "Web01", "Example.Internal", Name{"web01", "web01.example.internal"}},
		{"digits may lead a label", "1web", "", Name{"1web", ""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Make(tt.in, tt.domain)
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestMakeRefusesHostileNames(t *testing.T) {
	tests := []struct {
		name, in, domain, want string
	}{
		{"empty", "", "", "empty"},
		{"a space", "web 01", "", `has ' '`},
		{"a newline", "web01\nevil", "", `has '\n'`},
		{"a NUL", "web\x0001", "", `has '\x00'`},
		{"shell metacharacters", "web;reboot", "", `has ';'`},
		{"a command substitution", "$(id)", "", `has '$'`},
		{"backticks", "`id`", "", "has '`'"},
		{"Ruby interpolation", "#{exit}", "", `has '#'`},
		{"quotes", `web'01`, "", `has '\''`},
		{"an underscore", "web_01", "", `has '_'`},
		{"non-ASCII", "wéb01", "", `has 'é'`},
		{"an empty label", "web..example", "", "label 2 is empty"},
		{"a trailing dot", "web01.example.", "", "label 3 is empty"},
		{"a leading hyphen", "-web", "", "starts or ends with a hyphen"},
		{"a trailing hyphen", "web-.example", "", "starts or ends with a hyphen"},
		{"an over-long label", strings.Repeat("a", 64), "", "is 64 characters; the limit is 63"},
		{"an over-long name", strings.Repeat("abcdefghi.", 26) + "com", "", "the limit is 253"},
		{"a bad domain", "web01", "exa mple.com", "domain invalid host name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Make(tt.in, tt.domain)
			require.Error(t, err)
			assert.ErrorIs(t, err, ErrInvalid)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

func TestKernelNameFallsBackToShortWhenTheFQDNIsTooLong(t *testing.T) {
	long, err := Make("web01", strings.Repeat("a", 60)+".example")
	require.NoError(t, err)
	assert.Equal(t, "web01", long.Kernel(true), "an FQDN over 64 characters cannot be the kernel name")

	n, err := Make("web01", "example.internal")
	require.NoError(t, err)
	assert.Equal(t, "web01.example.internal", n.Kernel(true))
	assert.Equal(t, "web01", n.Kernel(false))
}

func TestHostsEntryPutsTheFQDNFirst(t *testing.T) {
	n, err := Make("web01", "example.internal")
	require.NoError(t, err)
	assert.Equal(t, "127.0.1.1\tweb01.example.internal web01", n.HostsEntry())
	short, err := Make("web01", "")
	require.NoError(t, err)
	assert.Equal(t, "127.0.1.1\tweb01", short.HostsEntry())
}

func FuzzMake(f *testing.F) {
	f.Add("web01", "example.internal")
	f.Add("Web-01.A.b", "")
	f.Fuzz(func(t *testing.T, name, domain string) {
		n, err := Make(name, domain)
		if err != nil {
			return
		}
		// Whatever is accepted must be safe in a hosts file, a shell and Ruby.
		for _, s := range []string{n.Short, n.FQDN} {
			if strings.ContainsAny(s, " \t\r\n\x00;$`'\"#{}\\/") || s != strings.ToLower(s) {
				t.Fatalf("accepted unsafe name %q", s)
			}
		}
		if err := Validate(n.String()); err != nil {
			t.Fatalf("Make accepted %q that Validate refuses: %v", n, err)
		}
	})
}
