// Package imdsfilter keeps the instance metadata service for the users
// allowed to reach it (imds.allow_users): bootagent's own nftables table,
// inet bootagent, whose output chain answers a connection to an IMDS
// endpoint from a socket of any other user with a TCP reset, so that the
// request fails at once ("connection refused") instead of hanging. It
// speaks netlink to the kernel (github.com/google/nftables) in the network
// namespace of the process, replaces its table in one batch, and touches no
// other table.
//
// A socket's user is its creator's file-system uid, which nftables matches
// with meta skuid; packets without a socket (a reset the kernel sends) are
// left alone.
package imdsfilter

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Table is the name of bootagent's table, in the inet family (IPv4 and
// IPv6 in one).
const Table = "bootagent"

const (
	chainName = "imds"
	setName   = "allowed_uids"
	// comment is what `nft list ruleset` shows on each rule.
	comment = "bootagent: IMDS only for the users in @allowed_uids (imds.allow_users)"
)

// The metadata service's own endpoints, IPv4 and IPv6 (Nitro instances in
// IPv6 subnets), which the agent's filter always covers.
var (
	IPv4Endpoint = netip.MustParseAddrPort("169.254.169.254:80")
	IPv6Endpoint = netip.MustParseAddrPort("[fd00:ec2::254]:80")
)

// User is one user whose sockets may reach IMDS.
type User struct {
	UID uint32
	// Name is shown beside the uid in `nft list ruleset`; it may be empty.
	Name string
}

// Rules is what the table holds: the endpoints it guards and the users let
// through to them.
type Rules struct {
	Endpoints []netip.AddrPort
	Users     []User
}

// Equal reports whether r and o let the same users through to the same
// endpoints (names aside).
func (r Rules) Equal(o Rules) bool {
	return slices.Equal(r.normal().Endpoints, o.normal().Endpoints) && slices.Equal(r.uids(), o.uids())
}

// normal sorts and deduplicates the endpoints and the users (by uid).
func (r Rules) normal() Rules {
	eps := make([]netip.AddrPort, 0, len(r.Endpoints))
	for _, e := range r.Endpoints {
		// An IPv4-mapped address leaves as IPv4: an ip6 rule for it
		// would never match.
		eps = append(eps, netip.AddrPortFrom(e.Addr().Unmap(), e.Port()))
	}
	slices.SortFunc(eps, func(a, b netip.AddrPort) int { return a.Compare(b) })
	users := slices.Clone(r.Users)
	slices.SortStableFunc(users, func(a, b User) int { return cmp.Compare(a.UID, b.UID) })
	users = slices.CompactFunc(users, func(a, b User) bool { return a.UID == b.UID })
	return Rules{Endpoints: slices.Compact(eps), Users: users}
}

func (r Rules) uids() []uint32 {
	var out []uint32
	for _, u := range r.normal().Users {
		out = append(out, u.UID)
	}
	return out
}

// String describes the rules for logs and `bootagent status`.
func (r Rules) String() string {
	n := r.normal()
	users := make([]string, 0, len(n.Users))
	for _, u := range n.Users {
		if u.Name != "" {
			users = append(users, fmt.Sprintf("%s (%d)", u.Name, u.UID))
		} else {
			users = append(users, fmt.Sprint(u.UID))
		}
	}
	eps := make([]string, 0, len(n.Endpoints))
	for _, e := range n.Endpoints {
		eps = append(eps, e.String())
	}
	return fmt.Sprintf("IMDS (%s) only for %s", strings.Join(eps, ", "), strings.Join(users, ", "))
}

// Filter installs, reads and removes the table in the network namespace of
// the process. Its zero value is not usable; make one with New.
type Filter struct {
	timeout time.Duration
}

// New returns a Filter whose every netlink exchange is cut after timeout.
func New(timeout time.Duration) *Filter { return &Filter{timeout: timeout} }

func (f *Filter) conn() (*nftables.Conn, error) {
	c, err := nftables.New(nftables.WithSockOptions(func(c *netlink.Conn) error {
		return c.SetDeadline(time.Now().Add(f.timeout))
	}))
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	return c, nil
}

func table() *nftables.Table {
	return &nftables.Table{Name: Table, Family: nftables.TableFamilyINet}
}

// Ensure makes the table hold r, and reports whether it had to: the table
// was missing, or held something else (another user's edit, a flush of the
// ruleset). It replaces the table in one batch, so that no packet ever
// meets half of it.
func (f *Filter) Ensure(r Rules) (bool, error) {
	if len(r.Endpoints) == 0 || len(r.Users) == 0 {
		return false, errors.New("nftables: a filter needs an endpoint and a user")
	}
	have, err := f.Read()
	if err == nil && have != nil && have.Equal(r) {
		return false, nil
	}
	return true, f.apply(r.normal())
}

func (f *Filter) apply(r Rules) error {
	c, err := f.conn()
	if err != nil {
		return err
	}
	t := table()
	// Adding the table first makes the deletion valid whether or not it
	// exists; the kernel carries out the batch as one transaction.
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	set := &nftables.Set{Table: t, Name: setName, KeyType: nftables.TypeUID, KeyByteOrder: binaryutil.NativeEndian}
	elems := make([]nftables.SetElement, 0, len(r.Users))
	for _, u := range r.Users {
		elems = append(elems, nftables.SetElement{Key: binaryutil.NativeEndian.PutUint32(u.UID), Comment: u.Name})
	}
	if err := c.AddSet(set, elems); err != nil {
		return fmt.Errorf("nftables: set %s: %w", setName, err)
	}
	accept := nftables.ChainPolicyAccept
	ch := c.AddChain(&nftables.Chain{
		Name: chainName, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityFilter, Policy: &accept,
	})
	for _, ep := range r.Endpoints {
		c.AddRule(&nftables.Rule{
			Table: t, Chain: ch, Exprs: ruleExprs(ep, set),
			UserData: userdata.AppendString(nil, userdata.TypeComment, comment),
		})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: install table inet %s: %w", Table, err)
	}
	return nil
}

// ruleExprs is `ip[6] daddr ADDR tcp dport PORT meta skuid != @allowed_uids
// reject with tcp reset`, as nft compiles it.
func ruleExprs(ep netip.AddrPort, set *nftables.Set) []expr.Any {
	proto, offset := byte(unix.NFPROTO_IPV4), uint32(16)
	if ep.Addr().Is6() {
		proto, offset = unix.NFPROTO_IPV6, 24
	}
	addr := ep.Addr().AsSlice()
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: uint32(len(addr))},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(ep.Port())},
		&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
		&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID, Invert: true},
		&expr.Reject{Type: unix.NFT_REJECT_TCP_RST},
	}
}

// changedError says that the table exists but holds what bootagent does
// not write there, or is switched off.
type changedError struct{ Reason string }

func (e *changedError) Error() string {
	return fmt.Sprintf("table inet %s was changed by hand or by another tool: %s", Table, e.Reason)
}

// Read returns what the table holds, or nil when there is no table. A
// table that holds anything bootagent does not write, or is dormant, is an
// error.
func (f *Filter) Read() (*Rules, error) {
	c, err := f.conn()
	if err != nil {
		return nil, err
	}
	t, err := c.ListTableOfFamily(Table, nftables.TableFamilyINet)
	if errors.Is(err, fs.ErrNotExist) || unsupported(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("nftables: read table inet %s: %w", Table, err)
	}
	if t.Flags != 0 {
		// Dormant (flags 1): its chains are unhooked, and filter nothing.
		return nil, &changedError{Reason: fmt.Sprintf("it has flags %#x (dormant: it filters nothing)", t.Flags)}
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("nftables: read the chains of table inet %s: %w", Table, err)
	}
	var ch *nftables.Chain
	for _, x := range chains {
		if x.Table.Name != Table {
			continue
		}
		if x.Name != chainName || ch != nil {
			return nil, &changedError{Reason: fmt.Sprintf("it has a chain %q", x.Name)}
		}
		ch = x
	}
	if ch == nil || ch.Hooknum == nil || *ch.Hooknum != *nftables.ChainHookOutput || ch.Type != nftables.ChainTypeFilter ||
		ch.Priority == nil || *ch.Priority != *nftables.ChainPriorityFilter || ch.Policy == nil || *ch.Policy != nftables.ChainPolicyAccept {
		return nil, &changedError{Reason: fmt.Sprintf("chain %s is missing or is not an output filter that accepts", chainName)}
	}
	sets, err := c.GetSets(t)
	if err != nil {
		return nil, fmt.Errorf("nftables: read the sets of table inet %s: %w", Table, err)
	}
	if len(sets) != 1 || sets[0].Name != setName || sets[0].KeyType.Name != nftables.TypeUID.Name {
		return nil, &changedError{Reason: fmt.Sprintf("it does not hold exactly the set %s of uids", setName)}
	}
	elems, err := c.GetSetElements(sets[0])
	if err != nil {
		return nil, fmt.Errorf("nftables: read set %s: %w", setName, err)
	}
	var r Rules
	for _, e := range elems {
		if len(e.Key) != 4 {
			return nil, &changedError{Reason: fmt.Sprintf("set %s holds a key of %d bytes", setName, len(e.Key))}
		}
		r.Users = append(r.Users, User{UID: binaryutil.NativeEndian.Uint32(e.Key), Name: e.Comment})
	}
	rules, err := c.GetRules(t, ch)
	if err != nil {
		return nil, fmt.Errorf("nftables: read chain %s: %w", chainName, err)
	}
	for _, rule := range rules {
		ep, ok := endpointOf(rule.Exprs, sets[0])
		if !ok {
			return nil, &changedError{Reason: fmt.Sprintf("chain %s holds a rule bootagent did not write (handle %d)", chainName, rule.Handle)}
		}
		r.Endpoints = append(r.Endpoints, ep)
	}
	n := r.normal()
	return &n, nil
}

// endpointOf returns the endpoint of a rule ruleExprs wrote, and false for
// any other rule.
func endpointOf(exprs []expr.Any, set *nftables.Set) (netip.AddrPort, bool) {
	if len(exprs) != 11 {
		return netip.AddrPort{}, false
	}
	a, okA := exprs[3].(*expr.Cmp)
	p, okP := exprs[7].(*expr.Cmp)
	if !okA || !okP || len(p.Data) != 2 {
		return netip.AddrPort{}, false
	}
	addr, ok := netip.AddrFromSlice(a.Data)
	if !ok {
		return netip.AddrPort{}, false
	}
	ep := netip.AddrPortFrom(addr, binaryutil.BigEndian.Uint16(p.Data))
	if !sameExprs(exprs, ruleExprs(ep, set)) {
		return netip.AddrPort{}, false
	}
	return ep, true
}

// sameExprs compares a rule read back with one written: the kernel names
// the set, and does not echo the ID a batch refers to it by.
func sameExprs(got, want []expr.Any) bool {
	for i := range want {
		l, ok := got[i].(*expr.Lookup)
		w, okW := want[i].(*expr.Lookup)
		if ok && okW {
			c := *l
			c.SetID = w.SetID
			got[i] = &c
		}
	}
	return reflect.DeepEqual(got, want)
}

// Remove deletes the table, and reports whether there was one.
func (f *Filter) Remove() (bool, error) {
	c, err := f.conn()
	if err != nil {
		return false, err
	}
	if _, err := c.ListTableOfFamily(Table, nftables.TableFamilyINet); errors.Is(err, fs.ErrNotExist) || unsupported(err) {
		return false, nil
	} else if err != nil {
		return false, fmt.Errorf("nftables: read table inet %s: %w", Table, err)
	}
	c.DelTable(table())
	if err := c.Flush(); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("nftables: delete table inet %s: %w", Table, err)
	}
	return true, nil
}

// unsupported reports whether err says the kernel has no nftables: then
// there is no table either.
func unsupported(err error) bool {
	return errors.Is(err, unix.EPROTONOSUPPORT) || errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.EOPNOTSUPP)
}
