package agent

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
)

// StatusCode maps the state to `bootagent status`'s exit status: 1 when the
// agent failed in a way that waits for a person (bad input, a refused
// validator, a deregistration that left something behind), else 0 once
// bootstrapped (or in a warm pool, or deregistered), 2 while still in
// progress (or not started).
func StatusCode(s State) int {
	switch {
	case s.Phase == PhaseFailed:
		return 1
	case s.Bootstrapped, s.Phase == PhaseWarmPool, s.Phase == PhaseDeregistered:
		return 0
	default:
		return 2
	}
}

// WriteText prints the state for people: where the agent is, what it did,
// and this boot's timeline, step by step.
func (s State) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	row := func(k, format string, args ...any) { fmt.Fprintf(tw, "%s\t"+format+"\n", append([]any{k}, args...)...) }
	if s.InstanceID == "" && s.Updated.IsZero() {
		row("state", "nothing yet: the agent has not run on this machine")
		return tw.Flush()
	}
	row("instance", "%s", s.InstanceID)
	row("phase", "%s", s.Phase)
	row("status", "%s", s.Status)
	if s.Error != "" {
		row("error", "%s", s.Error)
	}
	row("bootstrapped", "%t", s.Bootstrapped)
	if s.Hostname != "" {
		row("hostname", "%s (from %s)", s.Hostname, s.HostnameSource)
	}
	if s.NodeName != "" {
		registered := "not yet"
		if s.RegisteredAt != nil {
			registered = "registered " + s.RegisteredAt.UTC().Format(time.RFC3339)
		}
		row("chef node", "%s (%s)", s.NodeName, registered)
	}
	if r := s.LastRun; r != nil {
		row("last run", "%s: %s, exit code %d, %s, took %s", r.ID, r.Result, r.ExitCode, r.Start.UTC().Format(time.RFC3339), r.Duration.Round(time.Millisecond))
	}
	if s.NextRun != nil {
		row("next run", "%s", s.NextRun.UTC().Format(time.RFC3339))
	}
	if n := s.Notices; n != nil {
		if n.LifecycleState != "" {
			row("auto scaling", "%s", n.LifecycleState)
		}
		if n.Spot != nil {
			row("spot notice", "%s at %s", n.Spot.Action, n.Spot.Time.Format(time.RFC3339))
		}
		if n.Rebalance != nil {
			row("rebalance", "recommended %s", n.Rebalance.Format(time.RFC3339))
		}
		for _, m := range n.Maintenance {
			row("maintenance", "%s (%s) not before %s", m.Code, m.State, m.NotBefore.Format(time.RFC3339))
		}
	}
	if t := s.Termination; t != nil {
		final := ""
		if t.FinalRunDone {
			final = ", final run done"
		}
		row("terminating", "%s, noticed %s, deadline %s%s", t.Reason, t.NoticedAt.Format(time.RFC3339), t.Deadline.Format(time.RFC3339), final)
	}
	if d := s.Deregistration; d != nil {
		what := "deregistered"
		if d.InProgress {
			what = "deregistering"
		}
		row(what, "%s: node deleted %t, client deleted %t (%s)", d.At.Format(time.RFC3339), d.NodeDeleted, d.ClientDeleted, d.Reason)
		if len(d.LeftBehind) > 0 {
			row("left behind", "%s: %s", strings.Join(d.LeftBehind, ", "), d.Error)
		}
	}
	if f := s.IMDSFilter; f != nil {
		row("imds filter", "%s", f)
	}
	if !s.Boot.Started.IsZero() {
		row("boot", "started %s", s.Boot.Started.UTC().Format(time.RFC3339Nano))
		for _, st := range s.Boot.Steps {
			line := fmt.Sprintf("+%-12s took %s", st.Offset.Round(time.Microsecond), st.Duration.Round(time.Microsecond))
			if st.Detail != "" {
				line += " (" + st.Detail + ")"
			}
			row("  "+st.Name, "%s", line)
		}
	}
	row("updated", "%s by pid %d", s.Updated.UTC().Format(time.RFC3339), s.PID)
	return tw.Flush()
}
