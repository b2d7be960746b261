package agent

import (
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"os/user"
	"slices"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/imdsfilter"
)

// Filter keeps IMDS for the users imds.allow_users names: the agent's
// nftables table (imdsfilter.Filter).
type Filter interface {
	Ensure(r imdsfilter.Rules) (bool, error)
	Remove() (bool, error)
}

// filterTimeout bounds each netlink exchange with the kernel; a check makes
// six at most, which pollBudget counts.
const filterTimeout = 2 * time.Second

// filterKeeper applies imds.allow_users and keeps it applied. Users are
// looked up at each check, so that one a cookbook makes later is let
// through once it exists; until then it is left out, with a warning, once.
// Workers of one life and the next may call it, one at a time.
type filterKeeper struct {
	mu      sync.Mutex
	f       Filter
	lookup  func(name string) (uint32, error)
	self    uint32
	unknown map[string]bool
	// applied is what this process last put in place: finding anything
	// else while asking for the same is drift.
	applied *imdsfilter.Rules
	failed  repeatLog
	// unremoved is a table left in place that no list asks for any more.
	unremoved repeatLog
}

func newFilterKeeper(f Filter) *filterKeeper {
	return &filterKeeper{
		f: f, lookup: lookupUser, self: uint32(os.Geteuid()), unknown: map[string]bool{},
		failed:    repeatLog{msg: "could not filter IMDS as imds.allow_users asks; every user may reach it until this is fixed", recovered: "IMDS is filtered again as imds.allow_users asks"},
		unremoved: repeatLog{msg: "could not remove the IMDS filter that imds.allow_users no longer asks for; the users it left out stay refused", recovered: "the IMDS filter could be removed"},
	}
}

// lookupUser resolves a user name in /etc/passwd (the agent is built
// without cgo, so NSS modules are not asked), or takes a uid as it is.
func lookupUser(name string) (uint32, error) {
	if n, err := strconv.ParseUint(name, 10, 32); err == nil {
		return uint32(n), nil
	}
	u, err := user.Lookup(name)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(u.Uid, 10, 32)
	return uint32(n), err
}

// userName is uid's name in /etc/passwd, or "" when it has none.
func userName(uid uint32) string {
	u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10))
	if err != nil {
		return ""
	}
	return u.Username
}

// filterRules are the rules for a configuration: its users and the agent's
// own, at IMDS's addresses and at the configured endpoint's.
func filterRules(c config.IMDS, self uint32, lookup func(string) (uint32, error)) (imdsfilter.Rules, []string) {
	r := imdsfilter.Rules{Endpoints: []netip.AddrPort{imdsfilter.IPv4Endpoint, imdsfilter.IPv6Endpoint}}
	if ep, ok := c.EndpointAddr(); ok && !slices.Contains(r.Endpoints, ep) {
		r.Endpoints = append(r.Endpoints, ep)
	}
	var unknown []string
	for _, name := range c.AllowUsers {
		uid, err := lookup(name)
		if err != nil {
			unknown = append(unknown, name)
			continue
		}
		u := imdsfilter.User{UID: uid, Name: name}
		if _, err := strconv.ParseUint(name, 10, 32); err == nil {
			u.Name = userName(uid)
		}
		r.Users = append(r.Users, u)
	}
	// The agent reads IMDS itself, whoever else may.
	r.Users = append(r.Users, imdsfilter.User{UID: self, Name: userName(self)})
	return r, unknown
}

// filterKept is what one check of the filter did, for the caller to log
// with its own logger: the bootstrap's names the instance, which is not
// known yet when its check starts.
type filterKept struct {
	rules imdsfilter.Rules
	// on is false when imds.allow_users is empty.
	on, removed, changed bool
	// drift is a change to rules this process had put in place, not one
	// the configuration or a user made later asked for.
	drift bool
	// unknown are the users not found, the first time each is.
	unknown []string
	err     error
}

// keep makes the table what c asks for: in place when c.AllowUsers is set,
// gone when it is not.
func (k *filterKeeper) keep(c config.IMDS) filterKept {
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(c.AllowUsers) == 0 {
		k.applied = nil
		removed, err := k.f.Remove()
		return filterKept{removed: removed, err: err}
	}
	r := filterKept{on: true}
	var unknown []string
	r.rules, unknown = filterRules(c, k.self, k.lookup)
	for _, name := range unknown {
		if !k.unknown[name] {
			k.unknown[name] = true
			r.unknown = append(r.unknown, name)
		}
	}
	if r.changed, r.err = k.f.Ensure(r.rules); r.err == nil {
		r.drift = r.changed && k.applied != nil && k.applied.Equal(r.rules)
		k.applied = &r.rules
	}
	return r
}

// report logs what keep did. It never fails the agent: a filter that
// cannot be installed leaves IMDS as open as it was, which is logged (once
// until it changes) and shown by `bootagent status` and `diagnose`.
func (k *filterKeeper) report(log *zap.Logger, r filterKept) {
	k.mu.Lock()
	defer k.mu.Unlock()
	log = log.Named("imdsfilter")
	k.failed.log, k.unremoved.log = log, log
	if !r.on {
		switch {
		case r.err != nil && noFilterHere(r.err):
			// A machine without nftables, or an agent without
			// CAP_NET_ADMIN, has no table of the agent's to remove.
			log.Debug("IMDS filter not looked for", zap.Error(r.err))
		case r.err != nil:
			k.unremoved.fail(r.err)
		case r.removed:
			k.unremoved.ok()
			log.Info("IMDS is open to every user again: table inet " + imdsfilter.Table + " removed, since imds.allow_users is empty")
		}
		return
	}
	for _, name := range r.unknown {
		log.Warn("a user of imds.allow_users does not exist (yet): IMDS stays closed to it until it does", zap.String("user", name))
	}
	if r.err != nil {
		k.failed.fail(r.err)
		return
	}
	k.failed.ok()
	switch {
	case r.drift:
		log.Warn("the IMDS filter was missing or changed (a ruleset flush, a firewall reload, a hand edit); put back", zap.Stringer("filter", r.rules))
	case r.changed:
		log.Info("IMDS filtered", zap.Stringer("filter", r.rules))
	}
}

// noFilterHere reports whether err means the agent can have no table here:
// no permission to read nftables at all.
func noFilterHere(err error) bool { return errors.Is(err, fs.ErrPermission) }

// ApplyFilter puts the IMDS filter cfg asks for in place, once, logging
// what it did: `bootagent filter apply`, which the early unit runs before
// the network is up. An empty list changes nothing: the list may come from
// user-data, which only the daemon reads, and a table it keeps must not go
// when the early unit runs again.
func ApplyFilter(cfg config.Config, log *zap.Logger) error {
	if len(cfg.IMDS.AllowUsers) == 0 {
		log.Info("imds.allow_users is empty in the config file: nothing to apply (bootagent filter remove deletes a table)")
		return nil
	}
	k := newFilterKeeper(imdsfilter.New(filterTimeout))
	r := k.keep(cfg.IMDS)
	k.report(log, r)
	switch {
	case r.err != nil:
		return r.err
	case !r.changed:
		log.Info("IMDS filter already in place", zap.Stringer("filter", r.rules))
	}
	return nil
}

// RemoveFilter deletes the IMDS filter, and reports whether there was one.
func RemoveFilter() (bool, error) { return imdsfilter.New(filterTimeout).Remove() }

// FilterStatus is what the IMDS filter is in the kernel: On with the rules
// it holds, off, or Error when it could not be read.
type FilterStatus struct {
	On    bool   `json:"on"`
	Rules string `json:"rules,omitempty"`
	Error string `json:"error,omitempty"`
}

// ReadFilter reads the IMDS filter of the process's network namespace, for
// `bootagent status`. Reading nftables needs CAP_NET_ADMIN.
func ReadFilter() *FilterStatus {
	r, err := imdsfilter.New(filterTimeout).Read()
	switch {
	case errors.Is(err, fs.ErrPermission):
		return &FilterStatus{Error: "unknown: reading nftables needs root (CAP_NET_ADMIN)"}
	case err != nil:
		return &FilterStatus{Error: err.Error()}
	case r == nil:
		return &FilterStatus{}
	}
	return &FilterStatus{On: true, Rules: r.String()}
}

// String is the status line of the filter.
func (f FilterStatus) String() string {
	switch {
	case f.Error != "":
		return f.Error
	case f.On:
		return f.Rules
	}
	return "off: no table inet " + imdsfilter.Table + ", every user of the instance reaches IMDS"
}
