package imds

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	sdk "github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
)

// The metadata paths that announce what is about to happen to the
// instance.
const (
	lifecyclePath   = "autoscaling/target-lifecycle-state"
	spotActionPath  = "spot/instance-action"
	rebalancePath   = "events/recommendations/rebalance"
	maintenancePath = "events/maintenance/scheduled"
)

// Notices is what IMDS says is about to happen to the instance. A zero
// field means IMDS has nothing on that path.
type Notices struct {
	// LifecycleState is the Auto Scaling target lifecycle state: InService,
	// Warmed:Stopped, Terminated... ("" outside an Auto Scaling group).
	LifecycleState string `json:"lifecycle_state,omitempty"`
	// Spot is the spot interruption notice.
	Spot *SpotAction `json:"spot,omitempty"`
	// Rebalance is when EC2 recommended rebalancing this spot instance.
	Rebalance *time.Time `json:"rebalance,omitempty"`
	// Maintenance lists scheduled events: reboots, stops, retirement.
	Maintenance []MaintenanceEvent `json:"maintenance,omitempty"`
}

// SpotAction is a spot instance interruption notice.
type SpotAction struct {
	// Action is terminate, stop or hibernate.
	Action string    `json:"action"`
	Time   time.Time `json:"time"`
}

// MaintenanceEvent is one scheduled event.
type MaintenanceEvent struct {
	Code        string    `json:"code"`
	State       string    `json:"state"`
	Description string    `json:"description,omitempty"`
	NotBefore   time.Time `json:"not_before"`
}

// What the Auto Scaling target lifecycle states mean for the instance.
// IMDS gives the steady state the instance is headed for: InService,
// Standby and Detached keep it running (in or out of service, in or out of
// the group: its node stays); Warmed:Running, Warmed:Stopped and
// Warmed:Hibernated put it in a warm pool, prepared but not at work; and
// Terminated and Warmed:Terminated (terminated from the warm pool, after
// scale-in returned it there, or when the pool shrinks) end it for good.

// Terminating reports whether the notices announce that the instance is
// going away for good: an Auto Scaling termination (from service or from
// the warm pool) or a spot terminate action. A spot stop or hibernate, a
// reboot or a retirement stop keeps the instance, and with it its node.
func (n Notices) Terminating() bool {
	return n.LifecycleState == "Terminated" || n.LifecycleState == "Warmed:Terminated" || (n.Spot != nil && n.Spot.Action == "terminate")
}

// Warmed reports whether the instance is in an Auto Scaling warm pool: it
// is to be prepared, not put to work.
func (n Notices) Warmed() bool {
	return strings.HasPrefix(n.LifecycleState, "Warmed:") && n.LifecycleState != "Warmed:Terminated"
}

// Reading is one read of the notice paths. Each path is read and judged on
// its own, so that one that fails hides nothing another says: Failed holds
// why each failed path did, and Notices what the others said.
type Reading struct {
	Notices Notices
	Failed  map[string]error
}

// Over returns what is known after r: what r read, and for each path that
// failed the value last had.
func (r Reading) Over(last Notices) Notices {
	n := r.Notices
	for path := range r.Failed {
		switch path {
		case lifecyclePath:
			n.LifecycleState = last.LifecycleState
		case spotActionPath:
			n.Spot = last.Spot
		case rebalancePath:
			n.Rebalance = last.Rebalance
		case maintenancePath:
			n.Maintenance = last.Maintenance
		}
	}
	return n
}

// Notices reads the four notice paths, one request each with the session
// token already held. It makes a single attempt at each: the next poll is
// the retry.
func (c *Client) Notices(ctx context.Context) Reading {
	var r Reading
	n := &r.Notices
	read := func(path string, parse func([]byte) error) {
		body, err := c.getOnce(ctx, path)
		if errors.Is(err, ErrNotFound) {
			return
		}
		if err == nil {
			if perr := parse(body); perr != nil {
				err = fmt.Errorf("IMDS /latest/meta-data/%s: %w", path, perr)
			}
		}
		if err != nil {
			if r.Failed == nil {
				r.Failed = map[string]error{}
			}
			r.Failed[path] = err
		}
	}
	read(lifecyclePath, func(b []byte) (err error) { n.LifecycleState, err = ParseLifecycleState(b); return })
	read(spotActionPath, func(b []byte) (err error) { n.Spot, err = ParseSpotAction(b); return })
	read(rebalancePath, func(b []byte) (err error) { n.Rebalance, err = ParseRebalance(b); return })
	read(maintenancePath, func(b []byte) (err error) { n.Maintenance, err = ParseMaintenance(b); return })
	return r
}

// LifecycleState reads the Auto Scaling target lifecycle state once; ""
// outside an Auto Scaling group.
func (c *Client) LifecycleState(ctx context.Context) (string, error) {
	var state string
	err := c.read(ctx, "/latest/meta-data/"+lifecyclePath, func(ctx context.Context) error {
		body, err := c.getOnce(ctx, lifecyclePath)
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		state, err = ParseLifecycleState(body)
		return err
	})
	return state, err
}

// getOnce makes one GET of a meta-data path.
func (c *Client) getOnce(ctx context.Context, path string) ([]byte, error) {
	full := "/latest/meta-data/" + path
	var body []byte
	err := c.do(ctx, full, func(ctx context.Context) error {
		out, err := c.api.GetMetadata(ctx, &sdk.GetMetadataInput{Path: path})
		if err != nil {
			return err
		}
		defer out.Content.Close()
		body, err = io.ReadAll(out.Content)
		return err
	})
	var e *Error
	if errors.As(err, &e) && e.Status == http.StatusNotFound {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, full)
	}
	return body, err
}

// maxStateLen bounds a lifecycle state; the longest AWS defines is
// Warmed:Pending:Proceed.
const maxStateLen = 64

// stateChars are the characters of lifecycle states.
const stateChars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz:"

// ParseLifecycleState reads a target lifecycle state: one word of letters
// and colons.
func ParseLifecycleState(b []byte) (string, error) {
	s := strings.TrimSpace(string(b))
	if s == "" || len(s) > maxStateLen {
		return "", fmt.Errorf("lifecycle state %q is not one", truncate(s))
	}
	for _, r := range s {
		if !strings.ContainsRune(stateChars, r) {
			return "", fmt.Errorf("lifecycle state %q has %q", truncate(s), r)
		}
	}
	return s, nil
}

// ParseSpotAction reads a spot instance-action document.
func ParseSpotAction(b []byte) (*SpotAction, error) {
	var doc struct {
		Action string `json:"action"`
		Time   string `json:"time"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("spot instance-action is not JSON: %w", err)
	}
	switch doc.Action {
	case "terminate", "stop", "hibernate":
	default:
		return nil, fmt.Errorf("spot action %q is not terminate, stop or hibernate", truncate(doc.Action))
	}
	t, err := time.Parse(time.RFC3339, doc.Time)
	if err != nil {
		return nil, fmt.Errorf("spot action time %q: %w", truncate(doc.Time), err)
	}
	return &SpotAction{Action: doc.Action, Time: t.UTC()}, nil
}

// ParseRebalance reads a rebalance recommendation.
func ParseRebalance(b []byte) (*time.Time, error) {
	var doc struct {
		NoticeTime string `json:"noticeTime"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("rebalance recommendation is not JSON: %w", err)
	}
	t, err := time.Parse(time.RFC3339, doc.NoticeTime)
	if err != nil {
		return nil, fmt.Errorf("rebalance noticeTime %q: %w", truncate(doc.NoticeTime), err)
	}
	t = t.UTC()
	return &t, nil
}

// maintenanceTime is how IMDS writes scheduled event times.
const maintenanceTime = "2 Jan 2006 15:04:05 GMT"

// maxEvents bounds the scheduled events kept; an instance has a handful.
const maxEvents = 16

// ParseMaintenance reads the scheduled maintenance events.
func ParseMaintenance(b []byte) ([]MaintenanceEvent, error) {
	var docs []struct {
		Code        string
		State       string
		Description string
		NotBefore   string
	}
	if err := json.Unmarshal(b, &docs); err != nil {
		return nil, fmt.Errorf("scheduled events are not a JSON list: %w", err)
	}
	var out []MaintenanceEvent
	for _, d := range docs[:min(len(docs), maxEvents)] {
		e := MaintenanceEvent{Code: truncate(d.Code), State: truncate(d.State), Description: truncate(d.Description)}
		if t, err := time.Parse(maintenanceTime, d.NotBefore); err == nil {
			e.NotBefore = t.UTC()
		}
		out = append(out, e)
	}
	return out, nil
}

// truncate keeps text from IMDS short in messages and state.
func truncate(s string) string {
	const limit = 120
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}
