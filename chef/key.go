package chef

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"regexp"
	"strings"
)

// keyBits is the size of the key the instance makes for itself: what
// chef-client and knife make.
const keyBits = 2048

// GenerateKey makes the instance's key pair and returns the private key as
// PEM (PKCS #1, as chef-client writes client.pem).
func GenerateKey() ([]byte, error) {
	k, err := rsa.GenerateKey(rand.Reader, keyBits)
	if err != nil {
		return nil, fmt.Errorf("generate RSA key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)}), nil
}

// ParseKey reads an RSA private key in PEM, PKCS #1 or PKCS #8.
func ParseKey(data []byte) (*rsa.PrivateKey, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM block found")
	}
	if k, err := x509.ParsePKCS1PrivateKey(block.Bytes); err == nil {
		return k, nil
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("not an RSA private key: %w", err)
	}
	rk, ok := k.(*rsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("a %T, not an RSA private key", k)
	}
	return rk, nil
}

// PublicKeyPEM returns the public half of k as the Chef server stores it.
func PublicKeyPEM(k *rsa.PrivateKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		return "", err
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), nil
}

// samePublicKey reports whether two PEM public keys are the same key,
// whatever their line wrapping.
func samePublicKey(a, b string) bool {
	pa, _ := pem.Decode([]byte(a))
	pb, _ := pem.Decode([]byte(b))
	return pa != nil && pb != nil && string(pa.Bytes) == string(pb.Bytes)
}

var pemRE = regexp.MustCompile(`(?s)-----BEGIN ([A-Z ]+)-----(.*?)-----END ([A-Z ]+)-----`)

// NormalizeKeyPEM repairs a private key pasted into user-data, where YAML
// folding or a launch form often turns its newlines into spaces, and checks
// that it is an RSA private key. The result is a proper PEM.
func NormalizeKeyPEM(s string) ([]byte, error) {
	m := pemRE.FindStringSubmatch(s)
	if m == nil {
		return nil, invalid("validation key: no -----BEGIN ...----- / -----END ...----- block found")
	}
	if m[1] != m[3] {
		return nil, invalid("validation key: BEGIN %s does not match END %s", m[1], m[3])
	}
	body := strings.Join(strings.Fields(m[2]), "")
	der, err := base64.StdEncoding.DecodeString(body)
	if err != nil {
		return nil, invalid("validation key: the body is not base64 (%v)", err)
	}
	out := pem.EncodeToMemory(&pem.Block{Type: m[1], Bytes: der})
	if _, err := ParseKey(out); err != nil {
		return nil, invalid("validation key: %v", err)
	}
	return out, nil
}
