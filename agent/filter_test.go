package agent

import (
	"errors"
	"io/fs"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/imdsfilter"
)

// fakeFilter is a kernel table in memory: what the kernel would report
// to Ensure and Remove, with failures on demand.
type fakeFilter struct {
	table *imdsfilter.Rules
	err   error
}

func (f *fakeFilter) Ensure(r imdsfilter.Rules) (bool, error) {
	if f.err != nil {
		return false, f.err
	}
	if f.table != nil && f.table.Equal(r) {
		return false, nil
	}
	f.table = &r
	return true, nil
}

func (f *fakeFilter) Remove() (bool, error) {
	if f.err != nil {
		return false, f.err
	}
	had := f.table != nil
	f.table = nil
	return had, nil
}

func TestTheFilterKeeperLogsWhatChangedOnce(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	log := zap.New(core)
	f := &fakeFilter{}
	users := map[string]uint32{"root": 0, "cwagent": 990}
	k := newFilterKeeper(f)
	k.lookup = func(name string) (uint32, error) {
		if uid, ok := users[name]; ok {
			return uid, nil
		}
		return 0, errors.New("unknown user")
	}
	cfg := config.IMDS{AllowUsers: []string{"root", "app"}}
	keep := func(c config.IMDS) { k.report(log, k.keep(c)) }
	count := func(msg string) int { return logs.FilterMessage(msg).Len() }

	keep(cfg)
	assert.Equal(t, 1, count("IMDS filtered"))
	assert.Equal(t, 1, count("a user of imds.allow_users does not exist (yet): IMDS stays closed to it until it does"))
	keep(cfg)
	assert.Equal(t, 1, count("IMDS filtered"), "nothing changed: nothing said")
	assert.Equal(t, 1, count("a user of imds.allow_users does not exist (yet): IMDS stays closed to it until it does"), "the unknown user once")

	users["app"] = 1001
	keep(cfg)
	assert.Equal(t, 2, count("IMDS filtered"), "a user made later is let in, as a change, not as drift")
	assert.Zero(t, count("the IMDS filter was missing or changed (a ruleset flush, a firewall reload, a hand edit); put back"))
	assert.Contains(t, f.table.String(), "app (1001)")

	f.table = nil
	keep(cfg)
	assert.Equal(t, 1, count("the IMDS filter was missing or changed (a ruleset flush, a firewall reload, a hand edit); put back"), "the same rules gone: drift")

	f.err = errors.New("netlink: timeout")
	keep(cfg)
	keep(cfg)
	assert.Equal(t, 1, count("could not filter IMDS as imds.allow_users asks; every user may reach it until this is fixed"), "a failure once")
	f.err = nil
	keep(cfg)
	assert.Equal(t, 1, count("IMDS is filtered again as imds.allow_users asks"))

	keep(config.IMDS{})
	assert.Nil(t, f.table)
	assert.Equal(t, 1, count("IMDS is open to every user again: table inet bootagent removed, since imds.allow_users is empty"))
	keep(config.IMDS{})
	assert.Equal(t, 1, count("IMDS is open to every user again: table inet bootagent removed, since imds.allow_users is empty"), "nothing to remove the second time")

	f.err = &fs.PathError{Op: "netlink", Err: fs.ErrPermission}
	keep(config.IMDS{})
	assert.Equal(t, 1, logs.FilterMessage("IMDS filter not looked for").Len(), "no CAP_NET_ADMIN and nothing asked for: debug only")
	f.err = errors.New("netlink: timeout")
	keep(config.IMDS{})
	assert.Equal(t, 1, count("could not remove the IMDS filter that imds.allow_users no longer asks for; the users it left out stay refused"), "a removal that fails is a warning of its own")
}

func TestTheRulesAlwaysLetTheAgentInAndCoverTheEndpoint(t *testing.T) {
	r, unknown := filterRules(config.IMDS{Endpoint: "http://[::ffff:127.0.0.1]:1338", AllowUsers: []string{"4242", "ghost"}}, 0, lookupUser)
	require.Equal(t, []string{"ghost"}, unknown)
	assert.Equal(t, "IMDS (127.0.0.1:1338, 169.254.169.254:80, [fd00:ec2::254]:80) only for root (0), 4242", r.String())
	nobody := func(string) (uint32, error) { return 99, nil }
	assert.Equal(t, uint32(99), outsider(imdsfilter.Rules{Users: []imdsfilter.User{{UID: 0}}}, nobody), "nobody, as /etc/passwd names it")
	assert.Equal(t, uint32(98), outsider(imdsfilter.Rules{Users: []imdsfilter.User{{UID: 99}}}, nobody), "nobody let in: another uid is the outsider")
}
