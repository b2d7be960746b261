// Package hostname validates host names and applies them: the kernel host
// name, the static name in /etc/hostname (through systemd-hostnamed when it
// runs), and a managed entry in /etc/hosts so that `hostname -f` answers the
// FQDN.
package hostname

import (
	"errors"
	"fmt"
	"strings"
)

// ErrInvalid is matched by every refusal of a host name.
var ErrInvalid = errors.New("invalid host name")

const (
	// maxName is the longest DNS name (RFC 1035).
	maxName = 253
	// maxLabel is the longest DNS label.
	maxLabel = 63
	// maxKernel is the longest kernel host name (HOST_NAME_MAX); a longer
	// FQDN can only live in /etc/hosts.
	maxKernel = 64
)

// Name is a validated, lower-cased host name.
type Name struct {
	// Short is the first label.
	Short string
	// FQDN is the fully qualified name, or "" when there is no domain.
	FQDN string
}

// String returns the FQDN, or the short name when there is no domain.
func (n Name) String() string {
	if n.FQDN != "" {
		return n.FQDN
	}
	return n.Short
}

// IsZero reports whether n names nothing.
func (n Name) IsZero() bool { return n.Short == "" }

// Make validates name and completes it with domain. A name with a dot is
// already fully qualified, so domain is not appended to it; a short name with
// no domain has no FQDN.
func Make(name, domain string) (Name, error) {
	if name == "" {
		return Name{}, fmt.Errorf("%w: empty", ErrInvalid)
	}
	full := name
	if !strings.Contains(name, ".") && domain != "" {
		if err := Validate(domain); err != nil {
			return Name{}, fmt.Errorf("domain %w", err)
		}
		full = name + "." + domain
	}
	if err := Validate(full); err != nil {
		return Name{}, err
	}
	full = strings.ToLower(full)
	short, _, hasDomain := strings.Cut(full, ".")
	if !hasDomain {
		return Name{Short: short}, nil
	}
	return Name{Short: short, FQDN: full}, nil
}

// Validate checks that s is a host name by RFC 1123: labels of letters,
// digits and inner hyphens, 1 to 63 characters each, 253 in all. Anything
// else (spaces, newlines, shell or Ruby metacharacters, empty labels) is
// refused with the reason.
func Validate(s string) error {
	if s == "" {
		return fmt.Errorf("%w: empty", ErrInvalid)
	}
	if len(s) > maxName {
		return fmt.Errorf("%w: %q is %d characters; the limit is %d", ErrInvalid, shorten(s), len(s), maxName)
	}
	for i, label := range strings.Split(s, ".") {
		if err := validateLabel(label); err != nil {
			return fmt.Errorf("%w: %q: label %d %w", ErrInvalid, shorten(s), i+1, err)
		}
	}
	return nil
}

func validateLabel(l string) error {
	if l == "" {
		return fmt.Errorf("is empty (two dots in a row, or a leading or trailing dot)")
	}
	if len(l) > maxLabel {
		return fmt.Errorf("is %d characters; the limit is %d", len(l), maxLabel)
	}
	for _, r := range l {
		if !isLDH(r) {
			return fmt.Errorf("has %q; only letters, digits and hyphens are allowed", r)
		}
	}
	if l[0] == '-' || l[len(l)-1] == '-' {
		return fmt.Errorf("%q starts or ends with a hyphen", l)
	}
	return nil
}

// shorten keeps error messages readable when the input is huge.
func shorten(s string) string {
	const limit = 80
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}

// Kernel returns the name for the kernel and /etc/hostname: the FQDN when
// preferFQDN and it fits the kernel's limit, else the short name.
func (n Name) Kernel(preferFQDN bool) string {
	if preferFQDN && n.FQDN != "" && len(n.FQDN) <= maxKernel {
		return n.FQDN
	}
	return n.Short
}

// HostsEntry returns the /etc/hosts line that makes the name resolve, with
// the FQDN first so that it is the canonical name `hostname -f` prints.
func (n Name) HostsEntry() string {
	if n.FQDN == "" {
		return loopbackAddr + "\t" + n.Short
	}
	return loopbackAddr + "\t" + n.FQDN + " " + n.Short
}

// loopbackAddr is Debian's convention for the host's own name: 127.0.1.1, so
// that 127.0.0.1 keeps resolving to localhost alone.
const loopbackAddr = "127.0.1.1"

// isLDH reports whether r is a letter, digit or hyphen: the characters of
// a host name label.
func isLDH(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-'
}
