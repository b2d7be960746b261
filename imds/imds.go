// Package imds reads the EC2 instance metadata service through the AWS SDK's
// IMDS client: IMDSv2 session tokens (reused for their whole life), waiting
// for the service at boot, and the few paths the agent needs.
package imds

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	sdk "github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
	"github.com/aws/smithy-go"
	"github.com/aws/smithy-go/middleware"
	smithyhttp "github.com/aws/smithy-go/transport/http"
	"go.uber.org/zap"

	"github.com/bootagent/bootagent/backoff"
)

// ErrNotFound is returned for a path IMDS does not serve: a tag the instance
// does not have, or tags not enabled in its metadata options.
var ErrNotFound = errors.New("not found in IMDS")

// maxResponse bounds every IMDS answer. User-data, the largest, is at most
// 16 KiB on EC2; config.MaxUserDataSize is the agent's own bound, and this
// is one byte more so that an oversized answer is reported, not truncated.
const maxResponse = 1<<20 + 1

// Timeouts for one request, as the SDK's defaults: IMDS is a link-local
// service that answers in milliseconds or not at all.
const (
	dialTimeout           = 250 * time.Millisecond
	responseHeaderTimeout = 500 * time.Millisecond
)

// readAttempts bounds the retries of one read once IMDS has answered: a
// service that answered a moment ago and then fails five times in a row is
// reported rather than waited for.
const readAttempts = 5

// Options configures a Client.
type Options struct {
	// Endpoint is the IMDS URL; "" takes AWS_EC2_METADATA_SERVICE_ENDPOINT,
	// else the SDK's default.
	Endpoint string
	// IPv6 makes the SDK's default its IPv6 endpoint, [fd00:ec2::254]
	// (the SDK's endpoint mode), where an IPv6-only subnet reaches IMDS.
	IPv6 bool
	// AllowIMDSv1 lets the SDK fall back to token-less requests when the
	// token request is refused.
	AllowIMDSv1 bool
	// TokenTTL is the life of a session token; one token serves every
	// request until it expires.
	TokenTTL time.Duration
	// Backoff shapes retries; the zero value gives 200 ms doubling to 10 s.
	Backoff backoff.Policy
	// Clock paces retries; nil is the wall clock.
	Clock backoff.Clock
	Log   *zap.Logger
	// Observe, when set, is told of every request: its path, and its
	// error (nil on success), for metrics.
	Observe func(path string, err error)
}

// Client reads instance metadata.
type Client struct {
	api   *sdk.Client
	opts  Options
	log   *zap.Logger
	clock backoff.Clock
}

// New returns a Client. It sends nothing until a method is called.
func New(o Options) *Client {
	if o.Backoff == (backoff.Policy{}) {
		o.Backoff = backoff.Policy{Initial: 200 * time.Millisecond, Max: 10 * time.Second, Jitter: 0.5}
	}
	if o.Clock == nil {
		o.Clock = backoff.RealClock{}
	}
	if o.Log == nil {
		o.Log = zap.NewNop()
	}
	fallback := aws.FalseTernary
	if o.AllowIMDSv1 {
		fallback = aws.TrueTernary
	}
	api := sdk.New(sdk.Options{
		Endpoint:       o.Endpoint,
		EndpointMode:   o.endpointMode(),
		EnableFallback: fallback,
		HTTPClient:     newHTTPClient(),
		// Retries are the agent's own (one discipline, one log line per
		// change of reason); the SDK makes each attempt once.
		Retryer:                  aws.NopRetryer{},
		DisableDefaultMaxBackoff: true,
		APIOptions:               []func(*middleware.Stack) error{tokenTTL(o.TokenTTL), recordTokenFailure, observeToken(o.Observe)},
	})
	return &Client{api: api, opts: o, log: o.Log, clock: o.Clock}
}

func (o Options) endpointMode() sdk.EndpointModeState {
	if o.IPv6 {
		return sdk.EndpointModeStateIPv6
	}
	return sdk.EndpointModeStateIPv4
}

func newHTTPClient() sdk.HTTPClient {
	return limitedClient{awshttp.NewBuildableClient().
		WithDialerOptions(func(d *net.Dialer) { d.Timeout = dialTimeout }).
		WithTransportOptions(func(tr *http.Transport) {
			tr.ResponseHeaderTimeout = responseHeaderTimeout
			// IMDS is link-local: a proxy from the environment can
			// only get in the way (or answer for another machine).
			tr.Proxy = nil
		})}
}

// limitedClient refuses answers larger than maxResponse, since the SDK reads
// bodies whole into memory.
type limitedClient struct{ inner sdk.HTTPClient }

func (c limitedClient) Do(req *http.Request) (*http.Response, error) {
	resp, err := c.inner.Do(req)
	if err != nil {
		return nil, err
	}
	resp.Body = &limitedBody{rc: resp.Body, left: maxResponse, length: resp.ContentLength}
	return resp, nil
}

// ErrTooLarge is returned for an answer larger than the agent reads.
var ErrTooLarge = errors.New("IMDS answer is larger than 1 MiB")

// TooLargeError is an answer larger than the agent reads, with its size
// when known, so that an operator can see how far over it is.
type TooLargeError struct {
	// Size is the answer's length in bytes, or what was counted of it when
	// AtLeast.
	Size int64
	// AtLeast is true when the answer went on past what the agent counts,
	// or broke off while it was counted.
	AtLeast bool
}

func (e *TooLargeError) Error() string {
	if e.AtLeast {
		return fmt.Sprintf("the answer is more than %d bytes, more than the %d bootagent reads", e.Size, maxResponse-1)
	}
	return fmt.Sprintf("the answer is %d bytes, more than the %d bootagent reads", e.Size, maxResponse-1)
}

// Is makes errors.Is(err, ErrTooLarge) true.
func (e *TooLargeError) Is(target error) bool { return target == ErrTooLarge }

// maxCounted bounds how far an oversized answer is read on (and thrown
// away) to learn its size when IMDS did not send Content-Length.
const maxCounted = 64 << 20

type limitedBody struct {
	rc     io.ReadCloser
	left   int64
	length int64
}

func (b *limitedBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		return 0, b.tooLarge()
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.rc.Read(p)
	b.left -= int64(n)
	if b.left <= 0 && err == nil {
		return n, b.tooLarge()
	}
	return n, err
}

// tooLarge is the error for an answer that went past maxResponse.
func (b *limitedBody) tooLarge() error {
	if b.length > 0 {
		return &TooLargeError{Size: b.length}
	}
	rest, err := io.CopyN(io.Discard, b.rc, maxCounted)
	return &TooLargeError{Size: maxResponse + rest, AtLeast: err != io.EOF} //nolint:errorlint // CopyN returns io.EOF itself, unwrapped.
}

func (b *limitedBody) Close() error { return b.rc.Close() }

// tokenTTL makes the SDK ask for tokens of ttl instead of its fixed five
// minutes. The SDK caches a token for the life IMDS grants in its answer, so
// a longer life means fewer token requests over the agent's long life.
func tokenTTL(ttl time.Duration) func(*middleware.Stack) error {
	return func(stack *middleware.Stack) error {
		if stack.ID() != "getToken" || ttl <= 0 {
			return nil
		}
		secs := strconv.Itoa(int(ttl / time.Second))
		return stack.Build.Add(middleware.BuildMiddlewareFunc("bootagentTokenTTL",
			func(ctx context.Context, in middleware.BuildInput, next middleware.BuildHandler) (middleware.BuildOutput, middleware.Metadata, error) {
				if req, ok := in.Request.(*smithyhttp.Request); ok {
					req.Header.Set("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", secs)
				}
				return next.HandleBuild(ctx, in)
			}), middleware.After)
	}
}

// tokenPath is where IMDSv2 session tokens come from.
const tokenPath = "/latest/api/token"

// observeToken tells observe of each token request, which the SDK makes
// on its own.
func observeToken(observe func(string, error)) func(*middleware.Stack) error {
	return func(stack *middleware.Stack) error {
		if stack.ID() != "getToken" || observe == nil {
			return nil
		}
		return stack.Initialize.Add(middleware.InitializeMiddlewareFunc("bootagentObserveToken",
			func(ctx context.Context, in middleware.InitializeInput, next middleware.InitializeHandler) (middleware.InitializeOutput, middleware.Metadata, error) {
				out, md, err := next.HandleInitialize(ctx, in)
				observe(tokenPath, err)
				return out, md, err
			}), middleware.Before)
	}
}

// tokenFailure carries the error of a failed token request out of the SDK,
// which wraps it in a type that hides its cause.
type tokenFailure struct{ err error }

type tokenFailureKey struct{}

func recordTokenFailure(stack *middleware.Stack) error {
	if stack.ID() != "getToken" {
		return nil
	}
	return stack.Initialize.Add(middleware.InitializeMiddlewareFunc("bootagentTokenFailure",
		func(ctx context.Context, in middleware.InitializeInput, next middleware.InitializeHandler) (middleware.InitializeOutput, middleware.Metadata, error) {
			out, md, err := next.HandleInitialize(ctx, in)
			if f, ok := ctx.Value(tokenFailureKey{}).(*tokenFailure); ok && err != nil {
				f.err = err
			}
			return out, md, err
		}), middleware.Before)
}

// Error is a failed IMDS request, classified.
type Error struct {
	// Path is what was asked for.
	Path string
	// Status is the HTTP status, or 0 when no answer came.
	Status int
	// Token is true when the session token request failed.
	Token bool
	// Timeout is true when IMDS did not answer in time.
	Timeout bool
	// Malformed is true when IMDS answered with something that is not the
	// document asked for.
	Malformed bool
	Err       error
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "IMDS %s: ", e.Path)
	switch {
	case e.Token && e.Timeout:
		b.WriteString("the IMDSv2 token request (PUT /latest/api/token) timed out. When plain GET requests work, this is the hop limit: " +
			"the token answer is dropped before it reaches a container or a bridged network namespace. " +
			"Raise it with `aws ec2 modify-instance-metadata-options --http-put-response-hop-limit 2`")
	case e.Token && e.Status == http.StatusForbidden:
		b.WriteString("IMDS refused a session token (403): the metadata service is disabled for this instance (--http-endpoint disabled) or the token request is blocked")
	case e.Token && e.Status != 0:
		fmt.Fprintf(&b, "the IMDSv2 token request failed with HTTP %d", e.Status)
	case e.Token:
		b.WriteString("the IMDSv2 token request failed")
	case errors.As(e.Err, new(*TooLargeError)):
		// Its message says all there is.
	case e.Malformed:
		b.WriteString("the answer is not an instance identity document (JSON)")
	case e.Status != 0:
		fmt.Fprintf(&b, "HTTP %d", e.Status)
	case e.Timeout:
		b.WriteString("no answer in time")
	default:
		b.WriteString("no answer")
	}
	switch tl := new(*TooLargeError); {
	case e.Token && e.Timeout:
		// The hop-limit message says all there is.
	case errors.As(e.Err, tl):
		b.WriteString((*tl).Error())
	case e.Malformed:
		fmt.Fprintf(&b, ": %s", rootCause(e.Err))
		var de *smithy.DeserializationError
		if errors.As(e.Err, &de) && len(de.Snapshot) > 0 {
			fmt.Fprintf(&b, "; it begins %q", excerpt(de.Snapshot))
		}
	case e.Err != nil:
		fmt.Fprintf(&b, ": %v", e.Err)
	}
	return b.String()
}

func (e *Error) Unwrap() error { return e.Err }

// Reason is a short, stable description of the failure, for logging only
// when the reason changes.
func (e *Error) Reason() string {
	switch {
	case e.Token && e.Timeout:
		return "token request timed out (hop limit?)"
	case e.Token && e.Status != 0:
		return fmt.Sprintf("token request refused with HTTP %d", e.Status)
	case e.Token:
		return "token request failed: " + rootCause(e.Err)
	case e.Malformed:
		return "not an identity document"
	case e.Status != 0:
		return fmt.Sprintf("HTTP %d", e.Status)
	case e.Timeout:
		return "timeout"
	default:
		return rootCause(e.Err)
	}
}

// ErrorKinds are the kinds Kind names, for metrics that start at 0.
var ErrorKinds = []string{"token_timeout", "token_refused", "too_large", "malformed", "throttled", "http_5xx", "http_4xx", "timeout", "connection"}

// Kind names the failure for metrics: one of ErrorKinds.
func (e *Error) Kind() string {
	switch {
	case e.Token && e.Timeout:
		return "token_timeout"
	case e.Token:
		return "token_refused"
	case errors.Is(e.Err, ErrTooLarge):
		return "too_large"
	case e.Malformed:
		return "malformed"
	case e.Status == http.StatusTooManyRequests:
		return "throttled"
	case e.Status >= 500:
		return "http_5xx"
	case e.Status != 0:
		return "http_4xx"
	case e.Timeout:
		return "timeout"
	default:
		return "connection"
	}
}

// retryable reports whether asking again can help: no answer, a timeout,
// throttling, a server error, or a token that expired (401, after which the
// SDK fetches a new one). A 403 or 404 will not change by asking again,
// and neither will an answer that is too large or not what was asked for.
func (e *Error) retryable() bool {
	switch {
	case errors.Is(e.Err, ErrTooLarge), e.Malformed:
		return false
	case e.Status == 0, e.Status == http.StatusTooManyRequests, e.Status == http.StatusUnauthorized, e.Status >= 500:
		return true
	default:
		return false
	}
}

// rootCause strips the layers of operation names the SDK adds, leaving the
// innermost message, such as "connect: connection refused".
func rootCause(err error) string {
	if err == nil {
		return "unknown"
	}
	for {
		next := errors.Unwrap(err)
		if next == nil {
			return err.Error()
		}
		err = next
	}
}

// classify turns an SDK error into an *Error.
func classify(path string, err error, tf *tokenFailure) *Error {
	e := &Error{Path: path, Err: err}
	if tf.err != nil {
		e.Token = true
		e.Err = tf.err
		err = tf.err
	}
	var status interface{ HTTPStatusCode() int }
	if errors.As(err, &status) {
		e.Status = status.HTTPStatusCode()
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, context.DeadlineExceeded) {
		e.Timeout = true
	}
	var de *smithy.DeserializationError
	if errors.As(err, &de) && !e.Timeout && !errors.Is(err, ErrTooLarge) && !errors.As(err, new(net.Error)) {
		e.Malformed = true
	}
	return e
}

// do runs one SDK call, classifying its failure.
func (c *Client) do(ctx context.Context, path string, call func(context.Context) error) (err error) {
	if c.opts.Observe != nil {
		defer func() { c.opts.Observe(path, err) }()
	}
	tf := &tokenFailure{}
	err = call(context.WithValue(ctx, tokenFailureKey{}, tf))
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return classify(path, err, tf)
}

// read runs op, whose errors are already classified, with retries for what
// can succeed on retry, up to readAttempts.
func (c *Client) read(ctx context.Context, path string, op func(context.Context) error) error {
	b := backoff.New(c.opts.Backoff, c.clock)
	return b.Retry(ctx, readAttempts, func(ctx context.Context) error {
		err := op(ctx)
		var e *Error
		if errors.Is(err, ErrNotFound) || errors.As(err, &e) && !e.retryable() {
			return backoff.Permanent(err)
		}
		return err
	}, func(err error, delay time.Duration) {
		c.log.Debug("IMDS read failed; retrying", zap.String("path", path), zap.Error(err), zap.Duration("delay", delay))
	})
}

// Identity is the instance identity document's fields the agent uses.
type Identity struct {
	InstanceID       string `json:"instance_id"`
	Region           string `json:"region"`
	AvailabilityZone string `json:"availability_zone"`
	AccountID        string `json:"account_id"`
	InstanceType     string `json:"instance_type"`
	ImageID          string `json:"image_id"`
}

// Identity reads the instance identity document.
func (c *Client) Identity(ctx context.Context) (Identity, error) {
	var id Identity
	err := c.read(ctx, identityPath, func(ctx context.Context) error {
		var err error
		id, err = c.identityOnce(ctx)
		return err
	})
	return id, err
}

const identityPath = "/latest/dynamic/instance-identity/document"

// identityOnce makes one attempt at the identity document.
func (c *Client) identityOnce(ctx context.Context) (Identity, error) {
	var out *sdk.GetInstanceIdentityDocumentOutput
	err := c.do(ctx, identityPath, func(ctx context.Context) error {
		var err error
		out, err = c.api.GetInstanceIdentityDocument(ctx, nil)
		return err
	})
	if err != nil {
		return Identity{}, err
	}
	if !validInstanceID(out.InstanceID) {
		return Identity{}, backoff.Permanent(fmt.Errorf("IMDS %s: instance ID %q is not of the form i-0123abcd", identityPath, out.InstanceID))
	}
	return Identity{
		InstanceID:       out.InstanceID,
		Region:           out.Region,
		AvailabilityZone: out.AvailabilityZone,
		AccountID:        out.AccountID,
		InstanceType:     out.InstanceType,
		ImageID:          out.ImageID,
	}, nil
}

// validInstanceID reports whether s looks like an EC2 instance ID. It ends up
// in file names and Chef node names, so nothing else is accepted.
func validInstanceID(s string) bool {
	if len(s) < 3 || len(s) > 32 || !strings.HasPrefix(s, "i-") {
		return false
	}
	for _, r := range s[2:] {
		if !strings.ContainsRune("0123456789abcdef", r) {
			return false
		}
	}
	return true
}

// maxReasons bounds the reasons a wait keeps; a flapping IMDS would
// otherwise grow the list without end.
const maxReasons = 8

// WaitStats says how a wait for IMDS went.
type WaitStats struct {
	Attempts int           `json:"attempts"`
	Waited   time.Duration `json:"waited"`
	// Reasons are the distinct reasons IMDS did not answer, in order.
	Reasons []string `json:"reasons,omitempty"`
}

// Wait polls IMDS until it serves the identity document, then returns it. It
// waits forever when timeout is 0. The first failure is logged, and then
// only each change of reason, so a long wait at boot is three lines, not
// three thousand. A refusal that waiting cannot fix (a 403 on the token, a
// 404) ends the wait at once.
func (c *Client) Wait(ctx context.Context, timeout time.Duration) (Identity, WaitStats, error) {
	waitCtx := ctx
	if timeout > 0 {
		var cancel context.CancelFunc
		waitCtx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	start := c.clock.Now()
	b := backoff.New(c.opts.Backoff, c.clock)
	var (
		stats      WaitStats
		lastErr    error
		lastReason string
	)
	for {
		stats.Attempts++
		id, err := c.identityOnce(waitCtx)
		stats.Waited = c.clock.Now().Sub(start)
		if err == nil {
			if lastErr != nil {
				c.log.Info("IMDS answers", zap.Int("attempts", stats.Attempts), zap.Duration("waited", stats.Waited))
			}
			return id, stats, nil
		}
		var e *Error
		switch {
		case ctx.Err() != nil:
			return Identity{}, stats, ctx.Err()
		case waitCtx.Err() != nil:
			return Identity{}, stats, fmt.Errorf("IMDS did not answer within %s (imds.wait_timeout): %w", timeout, cmp.Or(lastErr, err))
		case !errors.As(err, &e) || !e.retryable():
			return Identity{}, stats, err
		}
		lastErr = err
		if r := e.Reason(); r != lastReason {
			c.log.Warn("waiting for IMDS", zap.String("reason", r), zap.Error(err))
			lastReason = r
			if len(stats.Reasons) < maxReasons {
				stats.Reasons = append(stats.Reasons, r)
			}
		}
		// A wait cut short by either context is reported at the top of
		// the loop, after one more attempt.
		_ = backoff.Wait(waitCtx, c.clock, b.Next())
	}
}

// Metadata reads a path under /latest/meta-data/.
func (c *Client) Metadata(ctx context.Context, path string) (string, error) {
	var value []byte
	err := c.read(ctx, "/latest/meta-data/"+path, func(ctx context.Context) error {
		var err error
		value, err = c.getOnce(ctx, path)
		return err
	})
	return string(value), err
}

// LocalHostname reads the instance's private DNS name.
func (c *Client) LocalHostname(ctx context.Context) (string, error) {
	s, err := c.Metadata(ctx, "local-hostname")
	return strings.TrimSpace(s), err
}

// Tag reads an instance tag. It returns ErrNotFound when the instance has no
// such tag or tags are not enabled in its metadata options.
func (c *Client) Tag(ctx context.Context, key string) (string, error) {
	s, err := c.Metadata(ctx, "tags/instance/"+key)
	if errors.Is(err, ErrNotFound) {
		return "", fmt.Errorf("tag %q: %w (the instance lacks the tag, or instance tags are not allowed in its metadata options: --instance-metadata-tags enabled)", key, err)
	}
	return s, err
}

// UserData reads the instance's user-data; nil when it has none (IMDS
// answers 404).
func (c *Client) UserData(ctx context.Context) ([]byte, error) {
	const path = "/latest/user-data"
	var data []byte
	err := c.read(ctx, path, func(ctx context.Context) error {
		return c.do(ctx, path, func(ctx context.Context) error {
			out, err := c.api.GetUserData(ctx, nil)
			if err != nil {
				return err
			}
			defer out.Content.Close()
			data, err = io.ReadAll(out.Content)
			return err
		})
	})
	var e *Error
	if errors.As(err, &e) && e.Status == http.StatusNotFound {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if data == nil {
		data = []byte{}
	}
	return data, nil
}

// excerpt quotes the start of an answer in an error, on one line.
func excerpt(data []byte) string {
	s := strings.Join(strings.Fields(strings.ToValidUTF8(string(data), "?")), " ")
	if r := []rune(s); len(r) > 80 {
		s = string(r[:80]) + "..."
	}
	return s
}

// String describes the endpoint, for logs.
func (c *Client) String() string {
	if c.opts.Endpoint != "" && c.opts.IPv6 {
		return c.opts.Endpoint + " (endpoint mode ipv6, which the endpoint overrides)"
	}
	if c.opts.Endpoint != "" {
		return c.opts.Endpoint
	}
	if c.opts.IPv6 {
		return "the SDK's endpoint (AWS_EC2_METADATA_SERVICE_ENDPOINT or the IPv6 default, endpoint mode ipv6)"
	}
	return "the SDK's endpoint (AWS_EC2_METADATA_SERVICE_ENDPOINT or the link-local default)"
}

// ProbeToken asks for a session token and one metadata path with it, and
// returns how long that took, or the classified failure (a token request
// that times out is the hop-limit problem).
func (c *Client) ProbeToken(ctx context.Context) (time.Duration, error) {
	start := c.clock.Now()
	_, err := c.getOnce(ctx, "instance-id")
	return c.clock.Now().Sub(start), err
}

// ProbeIMDSv1 makes one request without a session token, as an IMDSv1
// client would, and reports whether IMDS answered it: IMDSv2-only
// instances refuse it with 401.
func (c *Client) ProbeIMDSv1(ctx context.Context) (bool, error) {
	// The SDK wraps a 401 in an error that hides its status; the probe
	// reads the status off the answer itself.
	status := 0
	recordStatus := func(stack *middleware.Stack) error {
		if stack.ID() == "getToken" {
			return nil
		}
		return stack.Deserialize.Add(middleware.DeserializeMiddlewareFunc("bootagentRecordStatus",
			func(ctx context.Context, in middleware.DeserializeInput, next middleware.DeserializeHandler) (middleware.DeserializeOutput, middleware.Metadata, error) {
				out, md, err := next.HandleDeserialize(ctx, in)
				if res, ok := out.RawResponse.(*smithyhttp.Response); ok {
					status = res.StatusCode
				}
				return out, md, err
			}), middleware.After)
	}
	api := sdk.New(sdk.Options{
		Endpoint:     c.opts.Endpoint,
		EndpointMode: c.opts.endpointMode(),
		HTTPClient:   newHTTPClient(),
		Retryer:      aws.NopRetryer{},
		// The SDK asks for a token first (and goes on without one if it
		// is refused); the probe drops it from the request before it is
		// sent.
		EnableFallback:           aws.TrueTernary,
		DisableDefaultMaxBackoff: true,
		APIOptions:               []func(*middleware.Stack) error{dropToken, recordStatus},
	})
	_, err := api.GetMetadata(ctx, &sdk.GetMetadataInput{Path: "instance-id"})
	switch {
	case err == nil:
		return true, nil
	case status == http.StatusUnauthorized:
		return false, nil
	default:
		return false, classify("/latest/meta-data/instance-id", err, &tokenFailure{})
	}
}

// dropToken removes the session token from a metadata request, making it
// an IMDSv1 request.
func dropToken(stack *middleware.Stack) error {
	if stack.ID() == "getToken" {
		return nil
	}
	return stack.Finalize.Add(middleware.FinalizeMiddlewareFunc("bootagentDropToken",
		func(ctx context.Context, in middleware.FinalizeInput, next middleware.FinalizeHandler) (middleware.FinalizeOutput, middleware.Metadata, error) {
			if req, ok := in.Request.(*smithyhttp.Request); ok {
				req.Header.Del("X-Aws-Ec2-Metadata-Token")
			}
			return next.HandleFinalize(ctx, in)
		}), middleware.After)
}
