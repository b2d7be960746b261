package imdsfilter_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/imdsfilter"
	"github.com/bootagent/bootagent/internal/testenv"
)

// nft runs the nft command of the test's own namespace.
func nft(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(testenv.Tool(t, "nft"), args...).CombinedOutput()
	require.NoError(t, err, "nft %s: %s", strings.Join(args, " "), out)
	return string(out)
}

// listen serves connections on a loopback port until the test ends.
func listen(t *testing.T, network, addr string) netip.AddrPort {
	t.Helper()
	l, err := net.Listen(network, addr)
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return l.Addr().(*net.TCPAddr).AddrPort()
}

// bashConnect opens a connection to ep with bash's /dev/tcp as uid 65534,
// a process of another user altogether (setpriv, as an operator would
// check by hand).
func bashConnect(t *testing.T, ep netip.AddrPort) error {
	t.Helper()
	cmd := exec.Command(testenv.Tool(t, "setpriv"), "--reuid", "65534", "--regid", "65534", "--clear-groups", "--",
		"bash", "-c", "exec 3<>/dev/tcp/"+ep.Addr().String()+"/"+itoa(ep.Port()))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return errors.New(strings.TrimSpace(string(out)))
	}
	return nil
}

func itoa(p uint16) string { return strconv.Itoa(int(p)) }

func TestTheFilterLetsOnlyTheAllowedUsersReachTheEndpoints(t *testing.T) {
	testenv.RequireOwnFirewall(t)
	v4 := listen(t, "tcp4", "127.0.0.1:0")
	v6 := listen(t, "tcp6", "[::1]:0")
	other := listen(t, "tcp4", "127.0.0.1:0")
	f := imdsfilter.New(5 * time.Second)
	t.Cleanup(func() { _, _ = f.Remove() })
	rules := imdsfilter.Rules{Endpoints: []netip.AddrPort{v4, v6}, Users: []imdsfilter.User{{UID: 0, Name: "root"}, {UID: 4242}}}

	changed, err := f.Ensure(rules)
	require.NoError(t, err)
	assert.True(t, changed, "a new table is a change")
	listing := nft(t, "list", "table", "inet", "bootagent")
	assert.Contains(t, listing, "type filter hook output priority filter; policy accept;")
	assert.Contains(t, listing, "0 comment \"root\"")
	assert.Contains(t, listing, "4242", "the uid in the byte order meta skuid loads it in")
	assert.Contains(t, listing, "ip daddr 127.0.0.1 tcp dport "+itoa(v4.Port())+" meta skuid != @allowed_uids reject with tcp reset")
	assert.Contains(t, listing, "ip6 daddr ::1 tcp dport "+itoa(v6.Port())+" meta skuid != @allowed_uids reject with tcp reset")

	ctx := context.Background()
	for _, ep := range []netip.AddrPort{v4, v6} {
		assert.NoError(t, imdsfilter.DialAs(ctx, ep, 0), "root reaches %s", ep)
		assert.NoError(t, imdsfilter.DialAs(ctx, ep, 4242), "an allowed uid reaches %s", ep)
		start := time.Now()
		err := imdsfilter.DialAs(ctx, ep, 65534)
		assert.ErrorIs(t, err, syscall.ECONNREFUSED, "nobody is refused on %s", ep)
		assert.Less(t, time.Since(start), time.Second, "refused at once, not left to time out")
		assert.ErrorContains(t, bashConnect(t, ep), "refused", "a process of nobody is refused on %s", ep)
	}
	assert.ErrorIs(t, imdsfilter.DialAs(ctx, netip.MustParseAddrPort("[::ffff:127.0.0.1]:"+itoa(v4.Port())), 65534), syscall.ECONNREFUSED, "an IPv4-mapped address leaves as IPv4, and is refused")
	assert.NoError(t, imdsfilter.DialAs(ctx, other, 65534), "another port is nobody's to reach")
	assert.NoError(t, bashConnect(t, other))

	changed, err = f.Ensure(rules)
	require.NoError(t, err)
	assert.False(t, changed, "the same rules again change nothing")
	read, err := f.Read()
	require.NoError(t, err)
	assert.True(t, read.Equal(rules), "read back: %v", read)
	assert.Equal(t, "IMDS (127.0.0.1:"+itoa(v4.Port())+", [::1]:"+itoa(v6.Port())+") only for root (0), 4242", read.String())
}

func TestTheFilterIsRecreatedWhenItDrifts(t *testing.T) {
	testenv.RequireOwnFirewall(t)
	ep := listen(t, "tcp4", "127.0.0.1:0")
	f := imdsfilter.New(5 * time.Second)
	t.Cleanup(func() { _, _ = f.Remove() })
	rules := imdsfilter.Rules{Endpoints: []netip.AddrPort{ep}, Users: []imdsfilter.User{{UID: 0}}}
	_, err := f.Ensure(rules)
	require.NoError(t, err)

	for _, tamper := range [][]string{
		{"delete", "table", "inet", "bootagent"},
		{"flush", "ruleset"},
		{"insert", "rule", "inet", "bootagent", "imds", "accept"},
		{"flush", "chain", "inet", "bootagent", "imds"},
		{"add", "element", "inet", "bootagent", "allowed_uids", "{ 65534 }"},
		{"delete", "element", "inet", "bootagent", "allowed_uids", "{ 0 }"},
		{"add", "chain", "inet", "bootagent", "other"},
		{"add", "chain", "inet", "bootagent", "imds", "{ policy drop; }"},
		{"add", "table", "inet", "bootagent", "{ flags dormant; }"},
	} {
		t.Run(strings.Join(tamper, " "), func(t *testing.T) {
			nft(t, tamper...)
			changed, err := f.Ensure(rules)
			require.NoError(t, err)
			assert.True(t, changed, "the drift is seen")
			read, err := f.Read()
			require.NoError(t, err)
			require.NotNil(t, read)
			assert.True(t, read.Equal(rules), "put back: %v", read)
			assert.ErrorIs(t, imdsfilter.DialAs(context.Background(), ep, 65534), syscall.ECONNREFUSED)
		})
	}
}

func TestTheFilterTouchesNoOtherTable(t *testing.T) {
	testenv.RequireOwnFirewall(t)
	ep := listen(t, "tcp4", "127.0.0.1:0")
	nft(t, "add", "table", "inet", "mine")
	t.Cleanup(func() { _ = exec.Command("nft", "delete", "table", "inet", "mine").Run() })
	nft(t, "add", "chain", "inet", "mine", "out", "{ type filter hook output priority 0; policy accept; }")
	nft(t, "add", "rule", "inet", "mine", "out", "tcp dport 9 counter accept")
	nft(t, "add", "table", "ip", "bootagent")
	t.Cleanup(func() { _ = exec.Command("nft", "delete", "table", "ip", "bootagent").Run() })
	before := nft(t, "list", "ruleset")

	f := imdsfilter.New(5 * time.Second)
	_, err := f.Ensure(imdsfilter.Rules{Endpoints: []netip.AddrPort{ep}, Users: []imdsfilter.User{{UID: 0}}})
	require.NoError(t, err)
	during := nft(t, "list", "ruleset")
	assert.Equal(t, before, withoutTable(during, "table inet bootagent {"), "the other tables are as they were")

	removed, err := f.Remove()
	require.NoError(t, err)
	assert.True(t, removed)
	assert.Equal(t, before, nft(t, "list", "ruleset"), "removing the filter leaves the rest")
	assert.NoError(t, imdsfilter.DialAs(context.Background(), ep, 65534), "open to all again")
	removed, err = f.Remove()
	require.NoError(t, err)
	assert.False(t, removed, "nothing to remove the second time")
	read, err := f.Read()
	require.NoError(t, err)
	assert.Nil(t, read)
}

// withoutTable drops one table's block from `nft list ruleset`.
func withoutTable(listing, header string) string {
	start := strings.Index(listing, header)
	if start < 0 {
		return listing
	}
	end := strings.Index(listing[start:], "\n}\n")
	return listing[:start] + listing[start+end+len("\n}\n"):]
}

// BenchmarkEnsure is the check each poll makes (the table in place), and
// the first boot's install.
func BenchmarkEnsure(b *testing.B) {
	testenv.RequireOwnFirewall(b)
	f := imdsfilter.New(5 * time.Second)
	b.Cleanup(func() { _, _ = f.Remove() })
	rules := imdsfilter.Rules{Endpoints: []netip.AddrPort{imdsfilter.IPv4Endpoint, imdsfilter.IPv6Endpoint}, Users: []imdsfilter.User{{UID: 0}}}
	b.Run("in place", func(b *testing.B) {
		_, err := f.Ensure(rules)
		require.NoError(b, err)
		for b.Loop() {
			if changed, err := f.Ensure(rules); err != nil || changed {
				b.Fatal(changed, err)
			}
		}
	})
	b.Run("installed", func(b *testing.B) {
		for b.Loop() {
			b.StopTimer()
			_, err := f.Remove()
			require.NoError(b, err)
			b.StartTimer()
			if changed, err := f.Ensure(rules); err != nil || !changed {
				b.Fatal(changed, err)
			}
		}
	})
}
