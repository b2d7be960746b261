package chef

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"time"

	"github.com/bootagent/bootagent/atomicfile"
)

// MaxClockSkew is how far the Chef server lets a request's signed
// timestamp stray from its own clock before refusing it.
const MaxClockSkew = 15 * time.Minute

// Probe is what a look at the Chef server found.
type Probe struct {
	// Latency is how long the server took to answer.
	Latency time.Duration
	// Skew is the server's clock minus this machine's, from its Date
	// header; zero when it sent none.
	Skew time.Duration
	// KeyStatus is the HTTP status of a request signed with the node's
	// key: 200 when the server accepts the key, 401 when it does not
	// (revoked, or another key), 0 when not tried.
	KeyStatus int
}

// ProbeServer asks the Chef server something as the node, when keyPath
// holds its key, or anonymously otherwise, and reports whether it answers,
// how far its clock is from ours, and whether it accepts the key.
func (r *Registrar) ProbeServer(ctx context.Context, name, keyPath string) (Probe, error) {
	var p Probe
	start := time.Now()
	key, err := atomicfile.ReadFile(r.Server.root(), keyPath)
	var header http.Header
	switch {
	case err == nil:
		a, aerr := newAPI(r.Server, name, key)
		if aerr != nil {
			return p, aerr
		}
		header, err = a.doHeader(ctx, http.MethodGet, "clients/"+name, nil, nil)
		p.KeyStatus = http.StatusOK
		if s := StatusOf(err); s != 0 {
			p.KeyStatus, err = s, nil
		}
	case errors.Is(err, os.ErrNotExist):
		header, err = r.anonymous(ctx)
	default:
		return p, fmt.Errorf("read the node's key: %w", err)
	}
	p.Latency = time.Since(start)
	if err != nil {
		return p, err
	}
	if t, perr := http.ParseTime(header.Get("Date")); perr == nil {
		// Date has a resolution of a second; the request took Latency.
		p.Skew = t.Sub(start.Add(p.Latency / 2)).Round(time.Second)
	}
	return p, nil
}

// anonymous makes one unsigned request to the server's URL, for its Date.
func (r *Registrar) anonymous(ctx context.Context) (http.Header, error) {
	client, err := newHTTPClient(r.Server)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.Server.URL, nil)
	if err != nil {
		return nil, err
	}
	res, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", r.Server.URL, err)
	}
	res.Body.Close()
	return res.Header, nil
}
