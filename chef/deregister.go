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
)

// ErrDeleteRefused is returned when the Chef server will not let the node
// delete its node object or its own client.
var ErrDeleteRefused = errors.New("the Chef server refused the deletion")

// ErrKeyRefused is returned when the server does not accept the node's
// own key for a deletion, and nothing says its client is gone.
var ErrKeyRefused = errors.New("the Chef server no longer accepts the node's key")

// Deregistered says what Deregister removed. A node or client that was
// already gone counts as removed.
type Deregistered struct {
	NodeDeleted   bool `json:"node_deleted"`
	ClientDeleted bool `json:"client_deleted"`
	// NothingThere is true when the server never held the node: a
	// registration that ended before it made the client.
	NothingThere bool `json:"nothing_there,omitempty"`
	Retries      int  `json:"retries"`
}

// LeftBehind lists what is still on the server.
func (d Deregistered) LeftBehind(name string) []string {
	var left []string
	if !d.NodeDeleted {
		left = append(left, "node "+name)
	}
	if !d.ClientDeleted {
		left = append(left, "client "+name)
	}
	return left
}

// Leaving is the node Deregister removes.
type Leaving struct {
	Name string
	// KeyPath is the node's own key, which signs the deletions.
	KeyPath string
	// Confirmed is true when the registration was seen through. Otherwise
	// it may have ended before the client was created, and a server that
	// does not know the key holds nothing of the node.
	Confirmed bool
	// NodeGone is true when an earlier attempt deleted the node already.
	NodeGone bool
	// Resumed is true when an earlier attempt was cut short (a crash, a
	// restart) at a point its record does not say: it may have deleted the
	// client, which it deletes only once the node is gone. A key that then
	// opens nothing says both are.
	Resumed bool
	// OnNodeDeleted, when set, is told as soon as the node is gone, before
	// the client is deleted, so that the progress can be recorded.
	OnNodeDeleted func()
}

// Deregister removes the node and then its client from the Chef server,
// signing as the node with its own key, so that a terminated instance
// leaves nothing stale behind. The node goes first: once the client is
// gone the key opens nothing. What can pass (an unreachable server, 5xx,
// 429) is retried until r.Deadline, after at least one attempt of each
// deletion however late it is.
func (r *Registrar) Deregister(ctx context.Context, l Leaving) (out Deregistered, err error) {
	key, err := atomicfile.ReadFile(r.Server.root(), l.KeyPath)
	if errors.Is(err, fs.ErrNotExist) && !l.Confirmed {
		// The key is written before the first request of a registration:
		// without it, nothing reached the server.
		r.Log.Info("the registration never reached the Chef server: nothing to remove", zap.String("node_name", l.Name))
		return Deregistered{NodeDeleted: true, ClientDeleted: true, NothingThere: true}, nil
	}
	if err != nil {
		return out, fmt.Errorf("deregister %q: read the node's key: %w", l.Name, err)
	}
	node, err := newAPI(r.Server, l.Name, key)
	if err != nil {
		return out, fmt.Errorf("deregister %q: %w", l.Name, err)
	}
	var reg Registered
	defer func() { out.Retries = reg.Retries }()
	// keyWorked is true once the server accepted the key: a 401 after that
	// means the client is gone, not that the key is wrong.
	keyWorked := l.NodeGone || l.Resumed
	pass := r.pass()
	del := func(kind, path string) error {
		return r.retry(ctx, &reg, pass, func(ctx context.Context) error {
			err := node.do(ctx, http.MethodDelete, path, nil, nil)
			switch StatusOf(err) {
			case 0:
				if err == nil {
					keyWorked = true
				}
				return err
			case http.StatusNotFound:
				keyWorked = true
				r.Log.Info("already gone from the Chef server", zap.String("what", kind), zap.String("node_name", l.Name))
				return nil
			case http.StatusForbidden:
				return backoff.Permanent(refused(kind, l.Name, err))
			case http.StatusUnauthorized:
				if keyWorked || !l.Confirmed {
					// The key opened the node's deletion and no longer opens
					// anything: its client is gone. Or the registration never
					// got as far as the client: the server never had the key.
					r.Log.Info("the Chef server does not know the node's key: its client is gone", zap.String("what", kind), zap.String("node_name", l.Name))
					return backoff.Permanent(errGone)
				}
				return backoff.Permanent(fmt.Errorf("%w (%w): its client was deleted already, "+
					"or the key on this machine is not the one registered; an admin must remove what is left", ErrKeyRefused, err))
			}
			return err
		})
	}
	if !l.NodeGone {
		switch err := del("node", "nodes/"+l.Name); {
		case errors.Is(err, errGone):
			return Deregistered{NodeDeleted: true, ClientDeleted: true, NothingThere: !l.Confirmed && !l.Resumed}, nil
		case err != nil:
			return out, fmt.Errorf("delete node %q: %w", l.Name, err)
		}
		if l.OnNodeDeleted != nil {
			l.OnNodeDeleted()
		}
	}
	out.NodeDeleted = true
	if err := del("client", "clients/"+l.Name); err != nil && !errors.Is(err, errGone) {
		return out, fmt.Errorf("delete client %q: %w", l.Name, err)
	}
	out.ClientDeleted = true
	return out, nil
}

// errGone ends a deletion whose object is known to be gone.
var errGone = errors.New("gone")

// refused explains a 403 on a deletion and how to allow it.
func refused(kind, name string, err error) error {
	if kind == "client" {
		return fmt.Errorf("%w: client %q may not delete itself (%w). By default Chef Infra Server lets a node delete its node object but not its own client. "+
			"To allow it, grant delete on new clients before instances register: knife acl add group clients containers clients delete "+
			"(new clients inherit it; it also lets clients delete each other, so weigh it), or remove clients from a central job (knife client delete %s)",
			ErrDeleteRefused, name, err, name)
	}
	return fmt.Errorf("%w: node %q may not delete its node object (%w); restore the node's default ACL (the client owns its node), or delete it centrally (knife node delete %s)",
		ErrDeleteRefused, name, err, name)
}

// DefaultDeregisterTimeout bounds a deregistration that has no deadline of
// its own (an Auto Scaling termination says none; `bootagent deregister`):
// the two minutes' warning a spot instance gets.
const DefaultDeregisterTimeout = 2 * time.Minute
