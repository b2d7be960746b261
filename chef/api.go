package chef

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	gochef "github.com/go-chef/chef"
)

// ServerOptions say how to reach the Chef server.
type ServerOptions struct {
	// URL is the organisation URL, e.g. https://chef.example.com/organizations/acme.
	URL string
	// AuthProtocol is "1.3" or "1.0".
	AuthProtocol string
	// SSLVerify checks the server's certificate; off only for labs.
	SSLVerify bool
	// CAFile, when set, is a PEM bundle trusted besides the system's CAs;
	// the path is read as given (already under the agent's root).
	CAFile string
	// Timeout bounds one request.
	Timeout time.Duration
}

// requestTimeout bounds one request to the Chef server: generous for a
// loaded server, short enough that a dead connection does not hold a
// registration or a deregistration for long.
const requestTimeout = 30 * time.Second

// api is the Chef server API as one client identity (the validator or the
// node), with go-chef/chef signing every request.
type api struct {
	c *gochef.Client
}

func newAPI(o ServerOptions, name string, key []byte) (*api, error) {
	client, err := newHTTPClient(o)
	if err != nil {
		return nil, err
	}
	base := o.URL
	if !strings.HasSuffix(base, "/") {
		// go-chef resolves paths against the URL; without the slash the
		// organisation would be dropped.
		base += "/"
	}
	c, err := gochef.NewClient(&gochef.Config{
		Name:                  name,
		Key:                   string(key),
		BaseURL:               base,
		AuthenticationVersion: o.AuthProtocol,
		Client:                client,
	})
	if err != nil {
		return nil, fmt.Errorf("client %q for the Chef server: %w", name, err)
	}
	return &api{c: c}, nil
}

// newHTTPClient is the HTTP client for the Chef server: the trusted CAs,
// verification as configured, a bound on each request.
func newHTTPClient(o ServerOptions) (*http.Client, error) {
	tlsConfig := &tls.Config{InsecureSkipVerify: !o.SSLVerify} //nolint:gosec // Only when chef.ssl_verify is false, which the agent logs.
	if o.CAFile != "" {
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		pemData, err := os.ReadFile(o.CAFile)
		if err != nil {
			return nil, fmt.Errorf("read chef.trusted_certs: %w", err)
		}
		if !pool.AppendCertsFromPEM(pemData) {
			return nil, fmt.Errorf("chef.trusted_certs %s holds no PEM certificate", o.CAFile)
		}
		tlsConfig.RootCAs = pool
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.TLSClientConfig = tlsConfig
	timeout := o.Timeout
	if timeout == 0 {
		timeout = requestTimeout
	}
	return &http.Client{Transport: transport, Timeout: timeout}, nil
}

// APIError is a failed Chef server request.
type APIError struct {
	Method string
	Path   string
	// Status is the HTTP status, or 0 when no answer came.
	Status int
	// Message is the server's own explanation, when it gave one.
	Message    string
	retryAfter time.Duration
	Err        error
}

func (e *APIError) Error() string {
	switch {
	case e.untrusted():
		return fmt.Sprintf("%s %s: the Chef server's certificate is not trusted (%v); give the CA that signed it in chef.trusted_certs, or fix the server's certificate",
			e.Method, e.Path, e.Err)
	case e.Status == 0:
		return fmt.Sprintf("%s %s: %v", e.Method, e.Path, e.Err)
	case e.Message != "":
		return fmt.Sprintf("%s %s: HTTP %d: %s", e.Method, e.Path, e.Status, e.Message)
	default:
		return fmt.Sprintf("%s %s: HTTP %d", e.Method, e.Path, e.Status)
	}
}

func (e *APIError) Unwrap() error { return e.Err }

// RetryAfter is the delay the server asked for (429, 503), or 0.
func (e *APIError) RetryAfter() time.Duration { return e.retryAfter }

// Retryable reports whether asking again can help: no answer, throttling,
// or a server error. A 4xx is an answer that will not change, and neither
// is a certificate this machine does not trust.
func (e *APIError) Retryable() bool {
	if e.untrusted() {
		return false
	}
	return e.Status == 0 || e.Status == http.StatusTooManyRequests || e.Status >= 500
}

// untrusted reports whether the request failed on the server's
// certificate.
func (e *APIError) untrusted() bool {
	var verify *tls.CertificateVerificationError
	var unknown x509.UnknownAuthorityError
	var host x509.HostnameError
	var invalid x509.CertificateInvalidError
	return errors.As(e.Err, &verify) || errors.As(e.Err, &unknown) || errors.As(e.Err, &host) || errors.As(e.Err, &invalid)
}

// StatusOf returns the HTTP status of a failed request, or 0.
func StatusOf(err error) int {
	var e *APIError
	if errors.As(err, &e) {
		return e.Status
	}
	return 0
}

// do sends one signed request; body, when not nil, is sent as JSON, and a
// JSON answer is decoded into out when not nil.
func (a *api) do(ctx context.Context, method, path string, body, out any) error {
	_, err := a.doHeader(ctx, method, path, body, out)
	return err
}

// doHeader is do that also returns the answer's headers, when there was an
// answer.
func (a *api) doHeader(ctx context.Context, method, path string, body, out any) (http.Header, error) {
	var req *http.Request
	var err error
	if body != nil {
		r, jerr := gochef.JSONReader(body)
		if jerr != nil {
			return nil, fmt.Errorf("%s %s: %w", method, path, jerr)
		}
		req, err = a.c.NewRequest(method, path, r)
	} else {
		req, err = a.c.NewRequest(method, path, nil)
	}
	if err != nil {
		return nil, fmt.Errorf("%s %s: sign request: %w", method, path, err)
	}
	res, err := a.c.Do(req.WithContext(ctx), out)
	var header http.Header
	if res != nil {
		// go-chef has read the body; closing returns the connection.
		res.Body.Close()
		header = res.Header
	}
	if err == nil {
		return header, nil
	}
	e := &APIError{Method: method, Path: "/" + path, Err: err}
	var cerr *gochef.ErrorResponse
	if errors.As(err, &cerr) && res != nil {
		e.Status = res.StatusCode
		e.Message = cerr.StatusMsg()
		e.retryAfter = parseRetryAfter(res.Header.Get("Retry-After"), time.Now())
	}
	return header, e
}

// parseRetryAfter reads a Retry-After header: seconds, or an HTTP date.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if secs, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && secs > 0 {
		return time.Duration(secs) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}
