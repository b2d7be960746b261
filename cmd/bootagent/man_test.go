package main

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// usageCommands are the commands the usage lists, as typed ("userdata
// check", "filter apply").
func usageCommands(t *testing.T) []string {
	t.Helper()
	var cmds []string
	for _, m := range regexp.MustCompile(`(?m)^  bootagent ([a-z]+(?: check| apply| remove)?)`).FindAllStringSubmatch(usage, -1) {
		cmds = append(cmds, m[1])
	}
	require.NotEmpty(t, cmds)
	return cmds
}

// flagsOf are the flags a command takes, as its own -h prints them.
func flagsOf(t *testing.T, cmd string) []string {
	t.Helper()
	_, _, stderr := bootagent(t, "", append(strings.Fields(cmd), "-h")...)
	var flags []string
	for _, m := range regexp.MustCompile(`(?m)^  -([a-z-]+)`).FindAllStringSubmatch(stderr, -1) {
		flags = append(flags, m[1])
	}
	return flags
}

// bootagent(8) cannot drift from the command line: every command the usage
// lists has its synopsis and its section in the man page's source, and
// every flag a command takes is in its synopsis line, and in the usage
// (--log-level, which every command that loads the config takes, once for
// all).
func TestTheManPageAndTheUsageNameEveryCommandAndFlag(t *testing.T) {
	data, err := os.ReadFile("../../docs/man/bootagent.8.md")
	require.NoError(t, err)
	page := string(data)
	for _, cmd := range usageCommands(t) {
		synopsis := regexp.MustCompile(`(?m)^\*\*bootagent ` + regexp.QuoteMeta(cmd) + `\*\*(.*)$`).FindStringSubmatch(page)
		if !assert.NotNil(t, synopsis, "bootagent(8)'s synopsis has bootagent %s", cmd) {
			continue
		}
		assert.Regexp(t, `(?m)^\*\*`+regexp.QuoteMeta(cmd)+`\*\*$`, page, "bootagent(8) has a section for %s", cmd)
		usageLine := regexp.MustCompile(`(?m)^  bootagent ` + regexp.QuoteMeta(cmd) + ` .*$`).FindString(usage)
		flags := flagsOf(t, cmd)
		if cmd != "version" && cmd != "filter remove" {
			require.NotEmpty(t, flags, "bootagent %s -h lists its flags", cmd)
		}
		for _, flag := range flags {
			assert.Contains(t, synopsis[1], "**--"+flag+"**", "bootagent(8)'s synopsis of %s names --%s", cmd, flag)
			if flag != "log-level" {
				assert.Contains(t, usageLine, "--"+flag, "the usage line of %s names --%s", cmd, flag)
			}
			assert.Regexp(t, `(?m)^\*\*--`+regexp.QuoteMeta(flag)+`\*\*`, page, "bootagent(8)'s OPTIONS explain --%s", flag)
		}
	}
	assert.Contains(t, usage, "--log-level")
}
