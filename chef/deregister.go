package chef

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/backoff"
)

// ErrDeleteRefused is returned when the Chef server will not let the node
// delete its node object or its own client.
var ErrDeleteRefused = errors.New("the Chef server refused the deletion")

// Deregistered says what Deregister removed. A node or client that was
// already gone counts as removed.
type Deregistered struct {
	NodeDeleted   bool `json:"node_deleted"`
	ClientDeleted bool `json:"client_deleted"`
	Retries       int  `json:"retries"`
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

// Deregister removes the node and then its client from the Chef server,
// signing as the node with its own key, so that a terminated instance
// leaves nothing stale behind. The node goes first: once the client is
// gone the key opens nothing. What can pass (an unreachable server, 5xx,
// 429) is retried until ctx ends; give it the notice's deadline.
func (r *Registrar) Deregister(ctx context.Context, name, keyPath string) (out Deregistered, err error) {
	key, err := os.ReadFile(keyPath)
	if err != nil {
		return out, fmt.Errorf("deregister %q: read the node's key: %w", name, err)
	}
	node, err := newAPI(r.Server, name, key)
	if err != nil {
		return out, fmt.Errorf("deregister %q: %w", name, err)
	}
	var reg Registered
	del := func(kind, path string) error {
		return r.retry(ctx, &reg, func(ctx context.Context) error {
			err := node.do(ctx, http.MethodDelete, path, nil, nil)
			switch StatusOf(err) {
			case http.StatusNotFound:
				r.Log.Info("already gone from the Chef server", zap.String("what", kind), zap.String("node_name", name))
				return nil
			case http.StatusForbidden:
				return backoff.Permanent(refused(kind, name, err))
			case http.StatusUnauthorized:
				return backoff.Permanent(fmt.Errorf("the Chef server no longer accepts the node's key (%w): its client was deleted already, "+
					"or the key on this machine is not the one registered; an admin must remove what is left", err))
			}
			return err
		})
	}
	defer func() { out.Retries = reg.Retries }()
	if err := del("node", "nodes/"+name); err != nil {
		return out, fmt.Errorf("delete node %q: %w", name, err)
	}
	out.NodeDeleted = true
	if err := del("client", "clients/"+name); err != nil {
		return out, fmt.Errorf("delete client %q: %w", name, err)
	}
	out.ClientDeleted = true
	return out, nil
}

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
