package chef

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/atomicfile"
	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/internal/fault"
)

// ErrNameTaken is returned when another key already owns the node's client
// name on the server.
var ErrNameTaken = errors.New("node name taken")

// ErrValidatorRefused is returned when the server does not accept the
// validator's signature or rights; retrying cannot help.
var ErrValidatorRefused = errors.New("validator refused")

// ErrStopped is returned when Registrar.Stop ended the work.
var ErrStopped = errors.New("stopped before the next Chef server request")

// Registration is what registering one node needs.
type Registration struct {
	NodeName string
	// ClientKeyPath is where the node's private key is written, inside
	// the server options' Root.
	ClientKeyPath string
	ValidatorName string
	// ValidatorKey is the validator's private key; it may be nil when the
	// client already exists with the node's key (a later pass).
	ValidatorKey []byte
	// ValidatorPath names where the validator key was looked for, for
	// errors.
	ValidatorPath string
	Node          Node
}

// Node is the node object's content the agent sets.
type Node struct {
	Environment string
	RunList     []string
	PolicyName  string
	PolicyGroup string
	// Attributes are the initial attributes, set as normal attributes.
	Attributes map[string]any
}

// Registered says what Register found and did.
type Registered struct {
	// KeyReused is true when a key left by an interrupted registration was
	// used instead of a new one.
	KeyReused     bool
	ClientCreated bool
	NodeCreated   bool
	// Attempts counts requests that had to be retried.
	Retries int
}

// Registrar registers nodes.
type Registrar struct {
	Server ServerOptions
	Log    *zap.Logger
	// Backoff shapes retries of requests that can succeed on retry.
	Backoff backoff.Policy
	// Budget bounds the time the requests of one Register are tried for,
	// their retries and waits included; 0 is DefaultBudget. A server that
	// takes the connection and never answers is given up on at the budget
	// too.
	Budget time.Duration
	// Deadline, when set, bounds the retries instead: a request is tried
	// at least once, however late, and again only while a retry can start
	// before it.
	Deadline time.Time
	// Stop, when closed, ends the work with ErrStopped before its next
	// request. A request going is not cut off: its answer says what the
	// server made of it, which the caller needs (a registration stopped
	// because the instance terminates must know whether the client
	// exists, to delete it).
	Stop  <-chan struct{}
	Clock backoff.Clock
	// NewKey makes the instance's private key; nil is GenerateKey.
	NewKey func() ([]byte, error)
	// Observe, when set, is told of each request that failed with an
	// answer or none (an *APIError), before it is retried or given up on.
	Observe func(*APIError)
}

// Register makes the instance a Chef client and node. The key pair is made
// on the instance and its private half written (0600, atomically) before the
// client is created, so the server never holds a private key and a crash at
// any point leaves something the next attempt completes: a 409 for a client
// whose key is ours is success.
func (r *Registrar) Register(ctx context.Context, reg Registration) (Registered, error) {
	var out Registered
	if err := ValidateNodeName(reg.NodeName); err != nil {
		return out, err
	}
	pass := r.pass()
	newKey := r.NewKey
	if newKey == nil {
		newKey = GenerateKey
	}
	keyPEM, reused, err := ensureKey(r.Server.root(), reg.ClientKeyPath, newKey)
	if err != nil {
		return out, err
	}
	out.KeyReused = reused
	key, err := ParseKey(keyPEM)
	if err != nil {
		return out, fmt.Errorf("client key %s: %w", reg.ClientKeyPath, err)
	}
	pub, err := PublicKeyPEM(key)
	if err != nil {
		return out, err
	}
	node, err := newAPI(r.Server, reg.NodeName, keyPEM)
	if err != nil {
		return out, err
	}
	if reused {
		// A pass after a successful one finds the client with our key, and
		// the validator may be gone already: no need for it.
		var owned bool
		err := r.retry(ctx, &out, pass, func(ctx context.Context) error {
			var err error
			owned, err = ownsClient(ctx, node, reg.NodeName, pub)
			return err
		})
		if err != nil {
			return out, fmt.Errorf("register client %q: %w", reg.NodeName, err)
		}
		if owned {
			return r.finishNode(ctx, node, reg, pass, out)
		}
	}
	if len(reg.ValidatorKey) == 0 {
		return out, fmt.Errorf("register client %q: %w: no validator key at %s; place the organisation's validator key there (or give chef.validation_cert in user-data)",
			reg.NodeName, ErrValidatorRefused, reg.ValidatorPath)
	}
	validator, err := newAPI(r.Server, reg.ValidatorName, reg.ValidatorKey)
	if err != nil {
		return out, fmt.Errorf("validator key %s: %w", reg.ValidatorPath, err)
	}

	err = r.retry(ctx, &out, pass, func(ctx context.Context) error {
		var created struct {
			URI string `json:"uri"`
		}
		err := validator.do(ctx, http.MethodPost, "clients", map[string]string{"name": reg.NodeName, "public_key": pub}, &created)
		switch StatusOf(err) {
		case 0:
			if err == nil && created.URI == "" {
				// Every Chef server answers a created client with its URI;
				// an answer without one is not the server's.
				return &APIError{Method: http.MethodPost, URL: validator.url("clients"), Status: http.StatusCreated, unusable: true,
					Err: errors.New("the answer does not name the client it created (no uri)")}
			}
			if err == nil {
				out.ClientCreated = true
			}
			return err
		case http.StatusConflict:
			return r.checkOwnClient(ctx, node, reg.NodeName, pub)
		case http.StatusUnauthorized, http.StatusForbidden:
			return backoff.Permanent(fmt.Errorf("%w: the Chef server refused validator %q (%w); check chef.validation_client_name and that chef.validation_key is that client's key",
				ErrValidatorRefused, reg.ValidatorName, err))
		}
		return err
	})
	if err != nil {
		return out, fmt.Errorf("register client %q: %w", reg.NodeName, err)
	}
	fault.Point("client-created")
	if r.stopped() {
		return out, fmt.Errorf("register client %q: the client is created, the node is not: %w", reg.NodeName, ErrStopped)
	}
	return r.finishNode(ctx, node, reg, pass, out)
}

// finishNode creates or updates the node as the node's own client.
func (r *Registrar) finishNode(ctx context.Context, node *api, reg Registration, pass span, out Registered) (Registered, error) {
	err := r.retry(ctx, &out, pass, func(ctx context.Context) error {
		created, err := saveNode(ctx, node, reg.NodeName, reg.Node)
		out.NodeCreated = out.NodeCreated || created
		return err
	})
	if err != nil {
		return out, fmt.Errorf("save node %q: %w", reg.NodeName, err)
	}
	fault.Point("node-created")
	return out, nil
}

// DefaultBudget is how long the requests of one registration are tried for
// when the registrar names no budget: long enough to ride out a server
// restart, short enough that a first boot fails well inside the unit's
// TimeoutStartSec, and says why.
const DefaultBudget = 5 * time.Minute

// minAttempt is the least time a retry is started with: one started as the
// budget runs out would end in "no answer in time" and hide the reason the
// attempts before it failed.
const minAttempt = 5 * time.Second

// span is the time the requests of one pass (a registration, a
// deregistration) share: until end, which is the budget from the pass's
// start, or the deadline.
type span struct {
	end      time.Time
	budgeted bool
	budget   time.Duration
}

// pass is the span of a pass starting now.
func (r *Registrar) pass() span {
	if !r.Deadline.IsZero() {
		return span{end: r.Deadline}
	}
	budget := r.Budget
	if budget <= 0 {
		budget = DefaultBudget
	}
	return span{end: r.Clock.Now().Add(budget), budgeted: true, budget: budget}
}

// retry runs op with the registrar's backoff, retrying only what can
// succeed on retry, within the pass's span.
func (r *Registrar) retry(ctx context.Context, out *Registered, s span, op func(context.Context) error) error {
	b := backoff.New(r.Backoff, r.Clock)
	// The waits between attempts end when Stop closes; the requests
	// themselves keep ctx.
	waitCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	if r.Stop != nil {
		go func() {
			select {
			case <-r.Stop:
				cancel()
			case <-waitCtx.Done():
			}
		}()
	}
	attempt := func(context.Context) error {
		if r.stopped() {
			return backoff.Permanent(ErrStopped)
		}
		actx := ctx
		if s.budgeted {
			// The last attempt ends with the budget, however long the
			// server keeps it waiting.
			var cancel context.CancelFunc
			actx, cancel = context.WithTimeout(ctx, s.end.Sub(r.Clock.Now()))
			defer cancel()
		}
		err := op(actx)
		var e *APIError
		if errors.As(err, &e) && r.Observe != nil && !errors.Is(err, context.Canceled) {
			r.Observe(e)
		}
		if errors.As(err, &e) && !e.Retryable() {
			return backoff.Permanent(err)
		}
		return err
	}
	onRetry := func(err error, delay time.Duration) {
		out.Retries++
		r.Log.Warn("Chef server request failed; retrying", zap.Error(err), zap.Duration("retry_in", delay))
	}
	retryBy := s.end
	if s.budgeted {
		retryBy = s.end.Add(-minAttempt)
	}
	err := b.RetryUntil(waitCtx, retryBy, attempt, onRetry)
	switch {
	case err != nil && r.stopped() && !errors.Is(err, ErrStopped):
		err = fmt.Errorf("%w: %w", ErrStopped, err)
	case s.budgeted && retryable(err) && ctx.Err() == nil:
		// What could pass did not pass within the budget.
		err = fmt.Errorf("%w (gave up within chef.request_budget, %s)", err, s.budget)
	}
	return err
}

// retryable reports whether err is a failed request that asking again can
// help.
func retryable(err error) bool {
	var e *APIError
	return errors.As(err, &e) && e.Retryable()
}

// stopped reports whether Stop is closed.
func (r *Registrar) stopped() bool {
	select {
	case <-r.Stop:
		return true
	default:
		return false
	}
}

// ensureKey returns the private key at path under root, made and written
// first if there is none. A key already there is one an interrupted
// registration wrote; it is reused, so that a client created with it is
// recognised.
func ensureKey(root, path string, newKey func() ([]byte, error)) ([]byte, bool, error) {
	data, err := atomicfile.ReadFile(root, path)
	switch {
	case err == nil:
		if _, perr := ParseKey(data); perr == nil {
			return data, true, nil
		}
		// A damaged key cannot have registered anything that works:
		// replace it.
	case !errors.Is(err, fs.ErrNotExist):
		return nil, false, fmt.Errorf("read client key: %w", err)
	}
	data, err = newKey()
	if err != nil {
		return nil, false, err
	}
	if _, err := atomicfile.WriteFile(root, path, data, 0o600); err != nil {
		return nil, false, fmt.Errorf("write client key: %w", err)
	}
	fault.Point("key-written")
	return data, false, nil
}

// ownsClient reports whether the client called name exists with our key:
// whether the server accepts a request signed with it. A client that does
// not exist, or has another key, is refused (401) the same way.
func ownsClient(ctx context.Context, node *api, name, pub string) (bool, error) {
	var got struct {
		PublicKey string `json:"public_key"`
	}
	err := node.do(ctx, http.MethodGet, "clients/"+name+"/keys/default", nil, &got)
	if s := StatusOf(err); s == http.StatusNotFound || s == http.StatusMethodNotAllowed {
		// Servers before Chef 12 keep the key on the client itself.
		err = node.do(ctx, http.MethodGet, "clients/"+name, nil, &got)
	}
	switch s := StatusOf(err); {
	case err == nil:
		return got.PublicKey == "" || samePublicKey(got.PublicKey, pub), nil
	case s == http.StatusUnauthorized, s == http.StatusForbidden, s == http.StatusNotFound:
		return false, nil
	default:
		return false, err
	}
}

// checkOwnClient decides what a 409 on client creation means: if the client
// is ours, an earlier attempt created it and was interrupted; otherwise
// another instance or a person owns the name.
func (r *Registrar) checkOwnClient(ctx context.Context, node *api, name, pub string) error {
	owned, err := ownsClient(ctx, node, name, pub)
	switch {
	case err != nil:
		return err
	case owned:
		r.Log.Info("the Chef client exists with this instance's key: an earlier registration was interrupted; continuing", zap.String("node_name", name))
		return nil
	default:
		return backoff.Permanent(fmt.Errorf("%w: a client named %q already exists on the Chef server with another key. "+
			"Another instance uses the same name (an Auto Scaling group reusing host names?) or a stale client was left behind: "+
			"make names unique with chef.node_name: \"{hostname}-{instance_id}\", or delete the stale node and client (knife node delete / knife client delete %s)",
			ErrNameTaken, name, name))
	}
}

// nodeObject is the node as the server stores it.
type nodeObject struct {
	Name        string         `json:"name"`
	ChefType    string         `json:"chef_type"`
	JSONClass   string         `json:"json_class"`
	Environment string         `json:"chef_environment"`
	RunList     []string       `json:"run_list"`
	PolicyName  string         `json:"policy_name,omitempty"`
	PolicyGroup string         `json:"policy_group,omitempty"`
	Normal      map[string]any `json:"normal"`
	Default     map[string]any `json:"default"`
	Override    map[string]any `json:"override"`
	Automatic   map[string]any `json:"automatic"`
}

// saveNode creates the node, or updates the one that exists, and reports
// whether it created it. An update sets the run list, environment and
// policy and merges the initial attributes; whatever chef-client saved
// stays.
func saveNode(ctx context.Context, a *api, name string, spec Node) (bool, error) {
	n := nodeObject{
		Name: name, ChefType: "node", JSONClass: "Chef::Node",
		Environment: "_default", RunList: nonNil(spec.RunList),
		PolicyName: spec.PolicyName, PolicyGroup: spec.PolicyGroup,
		Normal: map[string]any{}, Default: map[string]any{}, Override: map[string]any{}, Automatic: map[string]any{},
	}
	if spec.Environment != "" {
		n.Environment = spec.Environment
	}
	for k, v := range spec.Attributes {
		n.Normal[k] = v
	}
	err := a.do(ctx, http.MethodPost, "nodes", n, nil)
	if StatusOf(err) != http.StatusConflict {
		return err == nil, err
	}
	var existing nodeObject
	if err := a.do(ctx, http.MethodGet, "nodes/"+name, nil, &existing); err != nil {
		return false, err
	}
	if existing.Name != name {
		// Saving it back would give this node another's attributes.
		return false, backoff.Permanent(&APIError{Method: http.MethodGet, URL: a.url("nodes/" + name), Status: http.StatusOK,
			Err: fmt.Errorf("the answer is node %q, not %q", existing.Name, name)})
	}
	existing.ChefType, existing.JSONClass = n.ChefType, n.JSONClass
	for _, m := range []*map[string]any{&existing.Default, &existing.Override, &existing.Automatic} {
		if *m == nil {
			*m = map[string]any{}
		}
	}
	existing.Environment, existing.RunList = n.Environment, n.RunList
	existing.PolicyName, existing.PolicyGroup = n.PolicyName, n.PolicyGroup
	if existing.Normal == nil {
		existing.Normal = map[string]any{}
	}
	for k, v := range spec.Attributes {
		existing.Normal[k] = v
	}
	return false, a.do(ctx, http.MethodPut, "nodes/"+name, existing, nil)
}
