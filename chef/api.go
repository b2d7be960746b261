package chef

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode"

	gochef "github.com/go-chef/chef"
	"golang.org/x/net/http/httpproxy"

	"github.com/bootagent/bootagent/atomicfile"
	"github.com/bootagent/bootagent/backoff"
)

// ServerOptions say how to reach the Chef server.
type ServerOptions struct {
	// URL is the organisation URL, e.g. https://chef.example.com/organizations/acme.
	URL string
	// AuthProtocol is "1.3" or "1.0".
	AuthProtocol string
	// SSLVerify checks the server's certificate; off only for labs.
	SSLVerify bool
	// CAFile, when set, is a PEM bundle trusted besides the system's CAs,
	// inside Root.
	CAFile string
	// Proxies, when set, carry the agent's requests to the server over
	// the environment's, as client.rb's carry chef-client's.
	Proxies Proxies
	// Root is the agent's root directory ("/" when empty): the CA bundle
	// and the keys the registrar reads are taken inside it, as every file
	// the agent writes is.
	Root string
	// Timeout bounds one request.
	Timeout time.Duration
}

// root is Root, "/" when empty.
func (o ServerOptions) root() string {
	if o.Root == "" {
		return "/"
	}
	return o.Root
}

// requestTimeout bounds one attempt at a request to the Chef server:
// generous for a loaded server, short enough that a dead connection does
// not hold a registration or a deregistration for long. The retries of one
// request are bounded by the registrar's budget as a whole.
const requestTimeout = 30 * time.Second

// maxAnswer bounds every answer the agent reads from the Chef server. The
// largest it reads is a node, which Chef Infra Server itself keeps under
// 1 MB (erchef's max_request_size); a longer answer is refused, not read
// on into memory.
const maxAnswer = 4 << 20

// excerptLen bounds how much of an answer an error quotes: enough for a
// server's message or the title of a proxy's error page, short enough to
// keep the error one readable line.
const excerptLen = 200

// api is the Chef server API as one client identity (the validator or the
// node): go-chef/chef signs every request, and the agent sends it and reads
// the answer itself, within its bounds.
type api struct {
	c    *gochef.Client
	http *http.Client
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
	return &api{c: c, http: client}, nil
}

// newHTTPClient is the HTTP client for the Chef server: the trusted CAs,
// verification as configured, a bound on each request, and no redirects.
func newHTTPClient(o ServerOptions) (*http.Client, error) {
	tlsConfig := &tls.Config{InsecureSkipVerify: !o.SSLVerify} //nolint:gosec // Only when chef.ssl_verify is false, which the agent logs.
	if o.CAFile != "" {
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		pemData, err := atomicfile.ReadFile(o.root(), o.CAFile)
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
	if o.Proxies.set() {
		// What the settings give, over the environment's.
		pc := httpproxy.FromEnvironment()
		pc.HTTPProxy, pc.HTTPSProxy = cmp.Or(o.Proxies.HTTP, pc.HTTPProxy), cmp.Or(o.Proxies.HTTPS, pc.HTTPSProxy)
		if o.Proxies.No != "" {
			pc.NoProxy = o.Proxies.noProxy()
		}
		proxy := pc.ProxyFunc()
		transport.Proxy = func(req *http.Request) (*url.URL, error) { return proxy(req.URL) }
	}
	timeout := o.Timeout
	if timeout == 0 {
		timeout = requestTimeout
	}
	return &http.Client{
		Transport: transport,
		Timeout:   timeout,
		// Chef's API needs no redirect, and following one would send the
		// signed headers and the body wherever the answer points (another
		// host, or https to http). The 3xx comes back as the answer, which
		// do reports with its Location.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}, nil
}

// APIError is a failed Chef server request.
type APIError struct {
	Method string
	// URL is the request's, without its password.
	URL string
	// Status is the HTTP status, or 0 when no answer came.
	Status int
	// Message is the server's own explanation, or an excerpt of its
	// answer, when it gave one.
	Message    string
	retryAfter time.Duration
	// unusable is true for a success whose answer could not be read or
	// decoded; the server may answer properly next time.
	unusable bool
	Err      error
}

func (e *APIError) Error() string {
	switch {
	case e.untrusted():
		return fmt.Sprintf("%s %s: the Chef server's certificate is not trusted (%v); give the CA that signed it in chef.trusted_certs, or fix the server's certificate",
			e.Method, e.URL, e.Err)
	case e.Status == 0:
		return fmt.Sprintf("%s %s: %v", e.Method, e.URL, e.Err)
	case e.Err != nil:
		return fmt.Sprintf("%s %s: HTTP %d: %v", e.Method, e.URL, e.Status, e.Err)
	case e.Message != "":
		return fmt.Sprintf("%s %s: HTTP %d: %s", e.Method, e.URL, e.Status, e.Message)
	default:
		return fmt.Sprintf("%s %s: HTTP %d", e.Method, e.URL, e.Status)
	}
}

func (e *APIError) Unwrap() error { return e.Err }

// RetryAfter is the delay the server asked for (429, 503), or 0.
func (e *APIError) RetryAfter() time.Duration { return e.retryAfter }

// Retryable reports whether asking again can help: no answer, throttling,
// a server error, or a success whose answer came broken. A 4xx is an
// answer that will not change, and neither is a certificate this machine
// does not trust, a redirect, or an answer over the size the agent reads.
func (e *APIError) Retryable() bool {
	switch {
	case e.untrusted(), errors.Is(e.Err, ErrAnswerTooLarge):
		return false
	default:
		return e.Status == 0 || e.unusable || e.Status == http.StatusTooManyRequests || e.Status >= 500
	}
}

// ErrorKinds are the kinds Kind names, for metrics that start at 0.
var ErrorKinds = []string{"untrusted", "too_large", "connection", "malformed", "throttled", "http_5xx", "redirect", "http_4xx"}

// Kind names the failure for metrics: one of ErrorKinds.
func (e *APIError) Kind() string {
	switch {
	case e.untrusted():
		return "untrusted"
	case errors.Is(e.Err, ErrAnswerTooLarge):
		return "too_large"
	case e.Status == 0:
		return "connection"
	case e.unusable:
		return "malformed"
	case e.Status == http.StatusTooManyRequests:
		return "throttled"
	case e.Status >= 500:
		return "http_5xx"
	case e.Status >= 300 && e.Status < 400:
		return "redirect"
	default:
		return "http_4xx"
	}
}

// ErrAnswerTooLarge is an answer over maxAnswer.
var ErrAnswerTooLarge = fmt.Errorf("the answer is larger than %d MiB", maxAnswer>>20)

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

// do sends one signed request; body, when not nil, is sent as JSON. A
// success must answer JSON: decoded into out when out is not nil (a JSON
// object then), or empty.
func (a *api) do(ctx context.Context, method, path string, body, out any) error {
	_, err := a.doHeader(ctx, method, path, body, out)
	return err
}

// doHeader is do that also returns the answer's headers, when there was an
// answer.
func (a *api) doHeader(ctx context.Context, method, path string, body, out any) (http.Header, error) {
	var r io.Reader
	if body != nil {
		jr, err := gochef.JSONReader(body)
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", method, a.url(path), err)
		}
		r = jr
	}
	req, err := a.c.NewRequest(method, path, r)
	if err != nil {
		return nil, fmt.Errorf("%s %s: sign request: %w", method, a.url(path), err)
	}
	e := &APIError{Method: method, URL: req.URL.Redacted()}
	// The transport, not the client: the client would follow a redirect,
	// or quote a Location it cannot parse whole in its error. The
	// client's timeout bounds the answer's body as well as its headers.
	ctx, cancel := context.WithTimeout(ctx, a.http.Timeout)
	defer cancel()
	res, err := a.http.Transport.RoundTrip(req.WithContext(ctx))
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("no answer in time (%w)", err)
		}
		e.Err = err
		return nil, e
	}
	defer res.Body.Close()
	e.Status = res.StatusCode
	data, err := io.ReadAll(io.LimitReader(res.Body, maxAnswer+1))
	switch {
	case res.StatusCode >= 300 && res.StatusCode < 400:
		e.Err = fmt.Errorf("the server redirected to %s; bootagent follows no redirect from the Chef server, whose API needs none: set chef.server_url to the URL it answers at", location(res))
		return res.Header, e
	case res.StatusCode < 200 || res.StatusCode >= 300:
		// A failure's answer is only quoted: what was read of it is
		// enough, whatever its size, and the status keeps its meaning.
		e.Message = serverMessage(res, data)
		e.retryAfter = parseRetryAfter(res.Header.Get("Retry-After"), time.Now())
		return res.Header, e
	case len(data) > maxAnswer:
		e.Err = ErrAnswerTooLarge
		return res.Header, e
	case err != nil:
		e.Err, e.unusable = fmt.Errorf("the answer broke off: %w", err), true
		return res.Header, e
	}
	if err := decodeAnswer(data, out); err != nil {
		e.Err, e.unusable = err, true
		return res.Header, e
	}
	return res.Header, nil
}

// location is where a redirect points, for its error: without a password,
// and short.
func location(res *http.Response) string {
	loc, err := res.Location()
	if err != nil {
		return "a Location that is not a URL"
	}
	return excerpt([]byte(loc.Redacted()))
}

// url is the URL of a request to path, for errors.
func (a *api) url(path string) string {
	u, err := url.Parse(path)
	if err != nil {
		return path
	}
	return a.c.BaseURL.ResolveReference(u).Redacted()
}

// decodeAnswer checks a success's answer: a JSON object decoded into out,
// or, when out is nil, empty or any JSON.
func decodeAnswer(data []byte, out any) error {
	if out == nil {
		if len(bytes.TrimSpace(data)) == 0 || json.Valid(data) {
			return nil
		}
		return fmt.Errorf("the answer is not JSON: %s", excerpt(data))
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("the answer is not JSON of the shape expected (%w): %s", err, excerpt(data))
	}
	return nil
}

// serverMessage is what a failure's answer says: the Chef server's own
// "error" messages when it gave them, else the start of the answer.
func serverMessage(res *http.Response, data []byte) string {
	res.Body = io.NopCloser(bytes.NewReader(data))
	var cerr *gochef.ErrorResponse
	if errors.As(gochef.CheckResponse(res), &cerr) && strings.TrimSpace(cerr.StatusMsg()) != "" {
		return excerpt([]byte(cerr.StatusMsg()))
	}
	return excerpt(data)
}

// pemBlock matches a PEM block in any case and dash count, or the start of
// one cut off; base64Run a run of base64 as long as a line of a key.
var (
	pemBlock  = regexp.MustCompile(`(?is)-{3,}\s*BEGIN[^\n]*?-{3,}.*?(-{3,}\s*END[^\n]*?-{3,}|$)`)
	base64Run = regexp.MustCompile(`[A-Za-z0-9+/]{48,}={0,2}`)
)

// excerpt quotes the start of an answer in an error: one line of printable
// text (a terminal escape is shown, not acted on), at most excerptLen
// characters, with anything that may be a key (a PEM block, a line of
// base64 in mixed case) left out: a broken server might echo one.
func excerpt(data []byte) string {
	s := pemBlock.ReplaceAllString(strings.ToValidUTF8(string(data), "?"), "[PEM block left out]")
	s = base64Run.ReplaceAllStringFunc(s, func(run string) string {
		if strings.ToLower(run) == run || strings.ToUpper(run) == run {
			return run // a hex digest, a word: no key
		}
		return "[base64 left out]"
	})
	s = strings.Join(strings.Fields(s), " ")
	var b strings.Builder
	for _, r := range s {
		if unicode.IsPrint(r) {
			b.WriteRune(r)
			continue
		}
		q := strconv.QuoteRune(r)
		b.WriteString(q[1 : len(q)-1])
	}
	s = b.String()
	if r := []rune(s); len(r) > excerptLen {
		s = string(r[:excerptLen]) + "..."
	}
	return s
}

// parseRetryAfter reads a Retry-After header: seconds, or an HTTP date.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if secs, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && secs > 0 {
		return time.Duration(min(secs, int(backoff.MaxRetryAfter/time.Second))) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}
