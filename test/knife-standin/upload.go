package main

import (
	"bufio"
	"bytes"
	"crypto/md5" //nolint:gosec // The Chef server names cookbook files by their MD5.
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	gochef "github.com/go-chef/chef"
)

// upload puts a chef-repo on the server as `knife upload /` does:
// environments/*.json and roles/*.json as they are (replacing what the
// server has under their names), and each cookbook under cookbooks/ through
// a sandbox (its files by checksum), then its version. It answers what it
// uploaded; uploading again changes nothing.
func upload(c *gochef.Client, repo string) (map[string][]string, error) {
	done := map[string][]string{}
	envs, _ := filepath.Glob(filepath.Join(repo, "environments", "*.json"))
	for _, path := range envs {
		var env gochef.Environment
		if err := readJSON(path, &env); err != nil {
			return nil, err
		}
		_, err := c.Environments.Create(&env)
		if conflict(err) {
			_, err = c.Environments.Put(&env)
		}
		if err != nil {
			return nil, fmt.Errorf("environment %s: %w", env.Name, err)
		}
		done["environments"] = append(done["environments"], env.Name)
	}
	roles, _ := filepath.Glob(filepath.Join(repo, "roles", "*.json"))
	for _, path := range roles {
		var role gochef.Role
		if err := readJSON(path, &role); err != nil {
			return nil, err
		}
		_, err := c.Roles.Create(&role)
		if conflict(err) {
			_, err = c.Roles.Put(&role)
		}
		if err != nil {
			return nil, fmt.Errorf("role %s: %w", role.Name, err)
		}
		done["roles"] = append(done["roles"], role.Name)
	}
	books, _ := filepath.Glob(filepath.Join(repo, "cookbooks", "*", "metadata.rb"))
	for _, meta := range books {
		name, err := uploadCookbook(c, filepath.Dir(meta))
		if err != nil {
			return nil, err
		}
		done["cookbooks"] = append(done["cookbooks"], name)
	}
	return done, nil
}

// conflict says whether err is the server's 409: the object is there.
func conflict(err error) bool {
	var e *gochef.ErrorResponse
	return errors.As(err, &e) && e.Response != nil && e.Response.StatusCode == http.StatusConflict
}

func readJSON(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// metadataLine is one line of metadata.rb the stand-in understands: a
// method and its quoted arguments.
var (
	metadataLine = regexp.MustCompile(`^(\w+)\s+((?:'[^'\\]*'|"[^"\\]*")(?:\s*,\s*(?:'[^'\\]*'|"[^"\\]*"))*)$`)
	quoted       = regexp.MustCompile(`'[^']*'|"[^"]*"`)
)

// readMetadata reads the name, version and dependencies of metadata.rb.
// knife evaluates the file as Ruby; the stand-in takes only lines of
// quoted arguments, and refuses any other line rather than misread it.
func readMetadata(path string) (gochef.CookbookMeta, error) {
	meta := gochef.CookbookMeta{Depends: map[string]string{}}
	data, err := os.ReadFile(path)
	if err != nil {
		return meta, err
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		m := metadataLine.FindStringSubmatch(line)
		if m == nil {
			return meta, fmt.Errorf("%s line %d: the stand-in reads only `method 'argument', ...` lines", path, n)
		}
		var args []string
		for _, a := range quoted.FindAllString(m[2], -1) {
			args = append(args, a[1:len(a)-1])
		}
		switch m[1] {
		case "name":
			meta.Name = args[0]
		case "version":
			meta.Version = args[0]
		case "depends":
			meta.Depends[args[0]] = ">= 0.0.0"
			if len(args) > 1 {
				meta.Depends[args[0]] = args[1]
			}
		case "description":
			meta.Description = args[0]
		case "maintainer":
			meta.Maintainer = args[0]
		case "license":
			meta.License = args[0]
		default:
			return meta, fmt.Errorf("%s line %d: %s is not read by the stand-in", path, n, m[1])
		}
	}
	if meta.Name == "" || meta.Version == "" {
		return meta, fmt.Errorf("%s: a cookbook needs a name and a version", path)
	}
	return meta, sc.Err()
}

// segment is where a cookbook file belongs in the version document.
func segment(rel string) string {
	top, _, nested := strings.Cut(rel, "/")
	switch {
	case !nested:
		return "root_files"
	case top == "recipes" || top == "attributes" || top == "templates" || top == "files" || top == "libraries" || top == "resources":
		return top
	}
	return ""
}

func uploadCookbook(c *gochef.Client, dir string) (string, error) {
	meta, err := readMetadata(filepath.Join(dir, "metadata.rb"))
	if err != nil {
		return "", err
	}
	meta.Recipes = map[string]string{}
	contents := map[string][]byte{}
	doc := map[string]any{
		"name": meta.Name + "-" + meta.Version, "cookbook_name": meta.Name, "version": meta.Version,
		"chef_type": "cookbook_version", "json_class": "Chef::CookbookVersion", "frozen?": false,
	}
	segments := map[string][]gochef.CookbookItem{}
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		seg := segment(rel)
		if seg == "" {
			return fmt.Errorf("%s: not in a cookbook segment", path)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		sum := md5.Sum(data) //nolint:gosec // The server's file names.
		checksum := hex.EncodeToString(sum[:])
		contents[checksum] = data
		specificity := "default"
		if parts := strings.Split(rel, "/"); (seg == "templates" || seg == "files") && len(parts) > 2 {
			specificity = parts[1]
		}
		segments[seg] = append(segments[seg], gochef.CookbookItem{Name: filepath.Base(rel), Path: rel, Checksum: checksum, Specificity: specificity})
		if seg == "recipes" {
			recipe := meta.Name + "::" + strings.TrimSuffix(filepath.Base(rel), ".rb")
			meta.Recipes[strings.TrimSuffix(recipe, "::default")] = ""
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	sums := make([]string, 0, len(contents))
	for sum := range contents {
		sums = append(sums, sum)
	}
	sort.Strings(sums)
	box, err := c.Sandboxes.Post(sums)
	if err != nil {
		return "", fmt.Errorf("cookbook %s: sandbox: %w", meta.Name, err)
	}
	for sum, item := range box.Checksums {
		if !item.Upload {
			continue
		}
		req, err := c.NewRequest("PUT", item.Url, bytes.NewReader(contents[sum]))
		if err != nil {
			return "", err
		}
		res, err := c.Do(req, nil)
		if err != nil {
			return "", fmt.Errorf("cookbook %s: upload %s: %w", meta.Name, sum, err)
		}
		res.Body.Close()
	}
	if _, err := c.Sandboxes.Put(box.ID); err != nil {
		return "", fmt.Errorf("cookbook %s: commit sandbox: %w", meta.Name, err)
	}
	for seg, items := range segments {
		doc[seg] = items
	}
	doc["metadata"] = meta
	body, err := gochef.JSONReader(doc)
	if err != nil {
		return "", err
	}
	req, err := c.NewRequest("PUT", "cookbooks/"+meta.Name+"/"+meta.Version, body)
	if err != nil {
		return "", err
	}
	res, err := c.Do(req, nil)
	if err != nil {
		return "", fmt.Errorf("cookbook %s %s: %w", meta.Name, meta.Version, err)
	}
	res.Body.Close()
	return meta.Name + " " + meta.Version, nil
}
