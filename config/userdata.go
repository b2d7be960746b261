package config

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/mail"
	"net/textproto"
	"regexp"
	"strings"
)

// MaxUserDataSize bounds user-data, before and after decompression. EC2
// accepts at most 16 KiB, so this leaves room for any real user-data while
// refusing garbage and gzip bombs.
const MaxUserDataSize = 1 << 20

// OversizedUserData is the error for user-data of size bytes, more than
// MaxUserDataSize: invalid input, since no retry makes it smaller.
func OversizedUserData(size int64) error {
	return &InvalidError{Source: "user-data", Reason: fmt.Sprintf("%d bytes is more than the %d bootagent reads (EC2 itself takes at most 16 KiB)", size, MaxUserDataSize)}
}

// maxNesting bounds how deep gzip and MIME may nest inside each other;
// cloud-init's own examples nest two levels.
const maxNesting = 4

// maxParts bounds the parts of one MIME message.
const maxParts = 64

// UserData describes what an instance's user-data contributed.
type UserData struct {
	// Format says how the user-data was understood, for example
	// "#cloud-config" or "gzip > MIME multipart > text/x-bootagent (key=value)".
	Format string `json:"format"`
	// Keys lists the settings it changed, as config key paths.
	Keys []string `json:"keys"`
	// Ignored lists what was left alone, and why.
	Ignored []string `json:"ignored,omitempty"`
	// PrivateKey is true when any document or part of it, read or left
	// alone (a write_files entry, a shell script), holds a PEM private
	// key: IMDS serves it for the instance's whole life.
	PrivateKey bool `json:"private_key,omitempty"`
}

// ApplyUserData decodes user-data and overlays it on base. It returns the new
// configuration, validated, or an error naming the user-data key and the
// reason; on error nothing of the user-data is applied.
func ApplyUserData(base Config, data []byte) (Config, UserData, error) {
	d := &decoder{cfg: base.clone()}
	if len(data) > MaxUserDataSize {
		return Config{}, UserData{}, OversizedUserData(int64(len(data)))
	}
	format, err := d.decode(data, "user-data", 0)
	if err != nil {
		return Config{}, UserData{}, err
	}
	if err := d.cfg.Validate(); err != nil {
		return Config{}, UserData{}, err
	}
	d.info.Format = format
	return d.cfg, d.info, nil
}

// decoder overlays the parts of one user-data on a working copy of the
// configuration.
type decoder struct {
	cfg  Config
	info UserData
}

var (
	gzipMagic = []byte{0x1f, 0x8b}
	// utf8BOM is the byte-order mark some Windows editors and PowerShell
	// write first. It means nothing in UTF-8 text, so one is dropped from
	// each document and part before its form is recognised: otherwise
	// "#cloud-config" or "{" is not what comes first, and the user-data
	// would be ignored without a word.
	utf8BOM = []byte{0xef, 0xbb, 0xbf}
	// pemPrivateKey ends the first line of every PEM private key: RSA,
	// EC, OpenSSH, PKCS#8, encrypted or not.
	pemPrivateKey = []byte("PRIVATE KEY-----")
	// keyValueRE matches the start of a key=value line.
	keyValueRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*[ \t]*=`)
	// cloudInitForms are the first lines of user-data meant for cloud-init
	// alone; bootagent leaves them to it.
	cloudInitForms = []string{"#!", "#include", "#cloud-boothook", "#part-handler", "#cloud-config-archive", "#upstart-job", "## template:", "#cloud-config-jsonp"}
)

// decode recognises the form of data and overlays it. where names the data
// in messages. It returns a description of the form.
func (d *decoder) decode(data []byte, where string, depth int) (string, error) {
	if depth > maxNesting {
		return "", &InvalidError{Source: where, Reason: fmt.Sprintf("gzip and MIME nest deeper than %d levels", maxNesting)}
	}
	data = bytes.TrimPrefix(data, utf8BOM)
	if bytes.Contains(data, pemPrivateKey) {
		d.info.PrivateKey = true
	}
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	switch {
	case len(trimmed) == 0:
		return "none", nil
	case bytes.HasPrefix(data, gzipMagic):
		inner, err := gunzip(data)
		if err != nil {
			return "", &InvalidError{Source: where, Reason: err.Error()}
		}
		f, err := d.decode(inner, where+" (gzip)", depth+1)
		return "gzip > " + f, err
	case isMIME(trimmed):
		return d.decodeMIME(trimmed, where, depth)
	case hasFirstLine(trimmed, "#cloud-config"):
		return "#cloud-config", d.decodeCloudConfig(trimmed, where+" #cloud-config")
	case startsWithAny(trimmed, cloudInitForms):
		first, _, _ := strings.Cut(string(trimmed[:min(len(trimmed), 40)]), "\n")
		d.ignore(fmt.Sprintf("%s: %q is for cloud-init or the shell, not bootagent", where, strings.TrimSpace(first)))
		return "ignored", nil
	case trimmed[0] == '{':
		return "JSON", d.decodeJSON(trimmed, where+" (JSON)")
	case looksKeyValue(trimmed):
		return "key=value", d.decodeKeyValue(trimmed, where+" (key=value)")
	default:
		d.ignore(where + ": not a form bootagent reads (key=value, JSON, #cloud-config, MIME, gzip)")
		return "ignored", nil
	}
}

func (d *decoder) ignore(why string) { d.info.Ignored = append(d.info.Ignored, why) }

func gunzip(data []byte) ([]byte, error) {
	zr, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("gzip: %w", err)
	}
	out, err := io.ReadAll(io.LimitReader(zr, MaxUserDataSize+1))
	if err != nil {
		return nil, fmt.Errorf("gzip: %w (truncated or corrupt)", err)
	}
	if len(out) > MaxUserDataSize {
		return nil, fmt.Errorf("gzip: decompresses to more than %d bytes", MaxUserDataSize)
	}
	return out, nil
}

func isMIME(data []byte) bool {
	head := strings.ToLower(string(data[:min(len(data), 64)]))
	return strings.HasPrefix(head, "content-type:") || strings.HasPrefix(head, "mime-version:")
}

func hasFirstLine(data []byte, want string) bool {
	line, _, _ := bytes.Cut(data, []byte("\n"))
	return string(bytes.TrimRight(line, " \t\r")) == want
}

func startsWithAny(data []byte, prefixes []string) bool {
	for _, p := range prefixes {
		if bytes.HasPrefix(data, []byte(p)) {
			return true
		}
	}
	return false
}

// looksKeyValue reports whether the first line that is neither blank nor a
// comment is a key=value line.
func looksKeyValue(data []byte) bool {
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), MaxUserDataSize)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		return keyValueRE.MatchString(line)
	}
	return false
}

func (d *decoder) decodeMIME(data []byte, where string, depth int) (string, error) {
	msg, err := mail.ReadMessage(bytes.NewReader(data))
	if err != nil {
		return "", &InvalidError{Source: where, Reason: fmt.Sprintf("MIME headers: %v", err)}
	}
	body, err := io.ReadAll(msg.Body)
	if err != nil {
		return "", &InvalidError{Source: where, Reason: fmt.Sprintf("MIME body: %v", err)}
	}
	return d.decodeEntity(textproto.MIMEHeader(msg.Header), body, where, depth+1)
}

// decodeEntity overlays one MIME entity: a multipart container or a leaf
// part.
func (d *decoder) decodeEntity(h textproto.MIMEHeader, body []byte, where string, depth int) (string, error) {
	if depth > maxNesting {
		return "", &InvalidError{Source: where, Reason: fmt.Sprintf("gzip and MIME nest deeper than %d levels", maxNesting)}
	}
	ctype := "text/plain"
	params := map[string]string{}
	if v := h.Get("Content-Type"); v != "" {
		var err error
		ctype, params, err = mime.ParseMediaType(v)
		if err != nil {
			return "", &InvalidError{Source: where, Reason: fmt.Sprintf("Content-Type %q: %v", v, err)}
		}
	}
	body, err := decodeTransfer(h.Get("Content-Transfer-Encoding"), body)
	if err != nil {
		return "", &InvalidError{Source: where, Reason: err.Error()}
	}

	if strings.HasPrefix(ctype, "multipart/") {
		boundary := params["boundary"]
		if boundary == "" {
			return "", &InvalidError{Source: where, Reason: fmt.Sprintf("%s without a boundary parameter", ctype)}
		}
		mr := multipart.NewReader(bytes.NewReader(body), boundary)
		var formats []string
		for i := 1; ; i++ {
			part, err := mr.NextRawPart()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return "", &InvalidError{Source: where, Reason: fmt.Sprintf("MIME part %d: %v", i, err)}
			}
			if i > maxParts {
				return "", &InvalidError{Source: where, Reason: fmt.Sprintf("more than %d MIME parts", maxParts)}
			}
			pbody, err := io.ReadAll(io.LimitReader(part, MaxUserDataSize+1))
			if err != nil {
				return "", &InvalidError{Source: where, Reason: fmt.Sprintf("MIME part %d: %v", i, err)}
			}
			pwhere := fmt.Sprintf("%s part %d", where, i)
			f, err := d.decodeEntity(part.Header, pbody, pwhere, depth+1)
			if err != nil {
				return "", err
			}
			formats = append(formats, f)
		}
		if len(formats) == 0 {
			return "", &InvalidError{Source: where, Reason: fmt.Sprintf("no part found with boundary %q", boundary)}
		}
		return "MIME multipart (" + strings.Join(formats, ", ") + ")", nil
	}

	if bytes.HasPrefix(body, gzipMagic) {
		inner, err := gunzip(body)
		if err != nil {
			return "", &InvalidError{Source: where, Reason: err.Error()}
		}
		body = inner
		where += " (gzip)"
	}
	body = bytes.TrimPrefix(body, utf8BOM)
	switch ctype {
	case "text/cloud-config":
		return ctype, d.decodeCloudConfig(body, where+" #cloud-config")
	case "text/x-bootagent":
		trimmed := bytes.TrimLeft(body, " \t\r\n")
		if len(trimmed) > 0 && trimmed[0] == '{' {
			return ctype + " (JSON)", d.decodeJSON(trimmed, where+" (JSON)")
		}
		return ctype + " (key=value)", d.decodeKeyValue(body, where+" (key=value)")
	case "text/plain", "application/octet-stream", "application/gzip", "application/x-gzip":
		f, err := d.decode(body, where, depth+1)
		return ctype + " (" + f + ")", err
	default:
		d.ignore(fmt.Sprintf("%s: %s is for cloud-init, not bootagent", where, ctype))
		return ctype + " (ignored)", nil
	}
}

func decodeTransfer(encoding string, body []byte) ([]byte, error) {
	switch strings.ToLower(strings.TrimSpace(encoding)) {
	case "", "7bit", "8bit", "binary":
		return body, nil
	case "base64":
		clean := bytes.Map(func(r rune) rune {
			if r == '\r' || r == '\n' || r == ' ' || r == '\t' {
				return -1
			}
			return r
		}, body)
		out := make([]byte, base64.StdEncoding.DecodedLen(len(clean)))
		n, err := base64.StdEncoding.Decode(out, clean)
		if err != nil {
			return nil, fmt.Errorf("base64 body: %w", err)
		}
		return out[:n], nil
	default:
		return nil, fmt.Errorf("Content-Transfer-Encoding %q is not supported; use base64 or none", encoding)
	}
}

// assignment is one setting from user-data, before it is applied.
type assignment struct {
	key    string // config key path
	value  any    // string, bool, []string or Object
	source string
}

// naming collects the name keys of one user-data document, which must agree
// with each other before they become hostname.name and hostname.domain.
type naming struct {
	hostname, domain, fqdn *sourced
}

type sourced struct {
	value, source string
}

// resolve turns fqdn, hostname and domain into assignments, refusing
// combinations that disagree.
func (n naming) resolve() ([]assignment, error) {
	var out []assignment
	switch {
	case n.fqdn != nil:
		fqdn := strings.ToLower(n.fqdn.value)
		short, _, _ := strings.Cut(fqdn, ".")
		if n.hostname != nil {
			h := strings.ToLower(n.hostname.value)
			if h != short && h != fqdn {
				return nil, &InvalidError{Source: n.hostname.source, Reason: fmt.Sprintf("hostname %q disagrees with fqdn %q; give fqdn alone", n.hostname.value, n.fqdn.value)}
			}
		}
		if n.domain != nil && !strings.HasSuffix(fqdn, "."+strings.ToLower(n.domain.value)) {
			return nil, &InvalidError{Source: n.domain.source, Reason: fmt.Sprintf("domain %q disagrees with fqdn %q; give fqdn alone", n.domain.value, n.fqdn.value)}
		}
		// The FQDN is complete, so a domain baked into the image must not
		// be appended to it.
		out = append(out, assignment{"hostname.name", n.fqdn.value, n.fqdn.source}, assignment{"hostname.domain", "", n.fqdn.source})
	case n.hostname != nil:
		out = append(out, assignment{"hostname.name", n.hostname.value, n.hostname.source})
		if strings.Contains(n.hostname.value, ".") {
			if n.domain != nil {
				return nil, &InvalidError{Source: n.hostname.source, Reason: fmt.Sprintf("hostname %q already has a domain and domain %q is also set; give fqdn, or a short hostname and domain", n.hostname.value, n.domain.value)}
			}
			// A dotted hostname is an FQDN, as cloud-init takes it.
			out = append(out, assignment{"hostname.domain", "", n.hostname.source})
		}
	}
	if n.domain != nil && n.fqdn == nil {
		out = append(out, assignment{"hostname.domain", n.domain.value, n.domain.source})
	}
	return out, nil
}

// apply sets the assignments on the working configuration, in order.
func (d *decoder) apply(as []assignment) {
	for _, a := range as {
		setKey(&d.cfg, a.key, a.value)
		d.cfg.setSource(a.key, a.source)
		d.info.Keys = appendUnique(d.info.Keys, a.key)
	}
}

func appendUnique(list []string, s string) []string {
	for _, e := range list {
		if e == s {
			return list
		}
	}
	return append(list, s)
}

// setKey stores one value; the key and the value's type come from the
// tables in this file, so they always match.
func setKey(c *Config, key string, v any) {
	switch key {
	case "imds.allow_users":
		c.IMDS.AllowUsers = v.([]string)
	case "hostname.name":
		c.Hostname.Name = v.(string)
	case "hostname.domain":
		c.Hostname.Domain = v.(string)
	case "hostname.prefer_fqdn":
		c.Hostname.PreferFQDN = v.(bool)
	case "hostname.manage_etc_hosts":
		c.Hostname.ManageEtcHosts = v.(bool)
	case "hostname.preserve":
		c.Hostname.Preserve = v.(bool)
	case "chef.server_url":
		c.Chef.ServerURL = v.(string)
	case "chef.node_name":
		c.Chef.NodeName = v.(string)
	case "chef.environment":
		c.Chef.Environment = v.(string)
	case "chef.run_list":
		c.Chef.RunList = v.([]string)
	case "chef.policy_name":
		c.Chef.PolicyName = v.(string)
	case "chef.policy_group":
		c.Chef.PolicyGroup = v.(string)
	case "chef.initial_attributes":
		c.Chef.InitialAttributes = v.(Object)
	case "chef.validation_client_name":
		c.Chef.ValidationClientName = v.(string)
	case "chef.validation_key":
		c.Chef.ValidationKey = v.(string)
	case "chef.validation_cert":
		c.Chef.ValidationCert = v.(string)
	case "chef.client_key":
		c.Chef.ClientKey = v.(string)
	case "chef.ssl_verify":
		c.Chef.SSLVerify = v.(bool)
	case "chef.delete_validation_key":
		c.Chef.DeleteValidationKey = v.(bool)
	case "chef.license":
		c.Chef.License = v.(string)
	case "chef.encrypted_data_bag_secret":
		c.Chef.EncryptedDataBagSecret = v.(string)
	case "chef.log_level":
		c.Chef.LogLevel = v.(string)
	case "chef.file_cache_path":
		c.Chef.FileCachePath = v.(string)
	case "chef.file_backup_path":
		c.Chef.FileBackupPath = v.(string)
	case "chef.pid_file":
		c.Chef.PIDFile = v.(string)
	case "chef.firstboot_path":
		c.Chef.FirstBootPath = v.(string)
	case "chef.json_attribs":
		c.Chef.JSONAttribs = v.(string)
	case "chef.show_time":
		show := v.(bool)
		c.Chef.ShowTime = &show
	case "chef.exec":
		c.Chef.Exec = v.(bool)
	default:
		panic("config: no setter for user-data key " + key)
	}
}
