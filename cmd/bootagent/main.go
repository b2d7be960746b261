// Command bootagent is the in-guest bootstrap agent for EC2 instances. See
// the README for the commands and DESIGN.md for the contract they keep.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/bootagent/bootagent/agent"
	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/systemd"
)

// version is stamped at build time with -ldflags "-X main.version=...".
var version = "unknown"

const usage = `usage:
  bootagent run    [--config FILE] [--root DIR]   the daemon (systemd Type=notify)
  bootagent once   [--config FILE] [--root DIR]   one full bootstrap pass, then exit
  bootagent status [--root DIR] [--json] [--wait[=DURATION]]
                                                 the agent's state; exit 0 bootstrapped,
                                                 1 failed, 2 in progress
  bootagent clean  [--config FILE] [--root DIR]   forget this instance (before baking an image)
  bootagent diagnose [--config FILE] [--root DIR] [--json]
                                                 check what the agent depends on, with fixes;
                                                 exit 1 when something is wrong
  bootagent deregister [--config FILE] [--root DIR] [--timeout DURATION]
                                                 remove this instance's node and client from
                                                 the Chef server (shutdown hooks, lifecycle scripts)
  bootagent userdata check [--config FILE] [--json] [FILE|-]
                                                 print what user-data would apply
  bootagent version

Exit status: 0 success, 1 runtime failure, 2 usage or invalid configuration/user-data.
`

// errUsage marks a command line that does not follow the usage.
var errUsage = errors.New("usage")

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// exitStatus is a command's exit status that is not an error: `status`
// says "in progress" with 2.
type exitStatus int

func (e exitStatus) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// run executes one command line and returns the exit status.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	err := dispatch(args, stdin, stdout, stderr)
	var code exitStatus
	if errors.As(err, &code) {
		return int(code)
	}
	if errors.Is(err, errUsage) {
		fmt.Fprintf(stderr, "bootagent: %v\n%s", err, usage)
		return 2
	}
	if err != nil {
		fmt.Fprintf(stderr, "bootagent: %v\n", err)
	}
	return agent.ExitCode(err)
}

func dispatch(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: no command given", errUsage)
	}
	switch cmd, rest := args[0], args[1:]; cmd {
	case "run", "once":
		return runAgent(cmd, rest, stdout, stderr)
	case "status":
		return status(rest, stdout, stderr)
	case "clean":
		return clean(rest, stdout, stderr)
	case "deregister":
		return deregister(rest, stdout, stderr)
	case "diagnose":
		return diagnose(rest, stdout, stderr)
	case "userdata":
		if len(rest) == 0 || rest[0] != "check" {
			return fmt.Errorf("%w: userdata takes the subcommand check", errUsage)
		}
		return checkUserData(rest[1:], stdin, stdout, stderr)
	case "version", "--version", "-v":
		fmt.Fprintf(stdout, "bootagent %s (%s)\n", version, runtime.Version())
		return nil
	case "help", "--help", "-h":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		return fmt.Errorf("%w: unknown command %q", errUsage, cmd)
	}
}

// commonFlags are the flags shared by the commands that load the config.
type commonFlags struct {
	config   string
	root     string
	logLevel zapcore.Level
}

func newFlagSet(name string, stderr io.Writer) (*flag.FlagSet, *commonFlags) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	c := &commonFlags{logLevel: zapcore.InfoLevel}
	fs.StringVar(&c.config, "config", config.DefaultPath, "config file")
	fs.StringVar(&c.root, "root", "/", "directory every system path is taken under")
	fs.Var(&c.logLevel, "log-level", "debug, info, warn or error")
	return fs, c
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	return nil
}

// loadConfig loads the file named by --config. The default file may be
// absent (the defaults then apply); a file named on the command line may not.
func (c *commonFlags) loadConfig(fs *flag.FlagSet) (config.Config, error) {
	named := false
	fs.Visit(func(f *flag.Flag) { named = named || f.Name == "config" })
	return config.Load(c.config, !named)
}

func runAgent(cmd string, args []string, stdout, stderr io.Writer) error {
	fs, common := newFlagSet(cmd, stderr)
	asJSON := fs.Bool("json", false, "print the result as JSON (once)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: %s takes no arguments", errUsage, cmd)
	}
	cfg, err := common.loadConfig(fs)
	if err != nil {
		return err
	}
	log := systemd.NewLogger(stderr, common.logLevel)
	defer func() { _ = log.Sync() }()
	log.Info("bootagent "+cmd, zap.String("version", version), zap.String("config", common.config), zap.String("root", common.root))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	e := agent.New(ctx, agent.Options{Config: cfg, Root: common.root, Log: log, Version: version})
	defer e.Close()

	if cmd == "run" {
		// SIGUSR1 starts a chef-client run now, as it does for chef-client's
		// own daemon.
		usr1 := make(chan os.Signal, 1)
		signal.Notify(usr1, syscall.SIGUSR1)
		defer signal.Stop(usr1)
		// SIGHUP reloads the config file; a file that does not load is
		// refused and the running configuration kept.
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
		go func() {
			for {
				select {
				case <-usr1:
					log.Info("SIGUSR1: chef-client run requested")
					e.TriggerRun()
				case <-hup:
					cfg, err := common.loadConfig(fs)
					if err != nil {
						log.Error("SIGHUP: the config does not load; keeping the running one", zap.Error(err))
						continue
					}
					log.Info("SIGHUP: reloading the config", zap.String("config", common.config))
					e.Reload(cfg)
				case <-ctx.Done():
					return
				}
			}
		}()
		return e.Run(ctx)
	}
	res, err := e.Once(ctx)
	if err != nil {
		return err
	}
	return output(stdout, *asJSON, res)
}

// report is a command's result, printable for people or as JSON.
type report interface {
	WriteText(w io.Writer) error
}

func output(w io.Writer, asJSON bool, r report) error {
	if !asJSON {
		return r.WriteText(w)
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

func status(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	root := fs.String("root", "/", "directory every system path is taken under")
	asJSON := fs.Bool("json", false, "print the state as JSON")
	var wait waitFlag
	fs.Var(&wait, "wait", "wait until bootstrapped or failed; with =DURATION, at most that long")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: status takes no arguments", errUsage)
	}
	deadline := time.Now().Add(wait.limit)
	for {
		st, err := agent.ReadState(*root)
		code := agent.StatusCode(st)
		if code == 2 && wait.on && (wait.limit == 0 || time.Now().Before(deadline)) {
			time.Sleep(statusPoll) // Polling the state file until it says done.
			continue
		}
		if err != nil {
			fmt.Fprintf(stderr, "bootagent: %v\n", err)
		}
		if err := output(stdout, *asJSON, st); err != nil {
			return err
		}
		if code == 0 {
			return nil
		}
		return exitStatus(code)
	}
}

// statusPoll is how often `status --wait` reads the state file: often
// enough that a launch script gates without delay, rarely enough to cost
// nothing.
const statusPoll = 250 * time.Millisecond

// waitFlag is --wait (no limit) or --wait=DURATION.
type waitFlag struct {
	on    bool
	limit time.Duration
}

func (w *waitFlag) String() string {
	if !w.on {
		return ""
	}
	return w.limit.String()
}

func (w *waitFlag) Set(v string) error {
	w.on = true
	if v == "true" {
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return fmt.Errorf("want a duration such as 5m, got %q", v)
	}
	w.limit = d
	return nil
}

// IsBoolFlag lets --wait stand alone.
func (w *waitFlag) IsBoolFlag() bool { return true }

func clean(args []string, stdout, stderr io.Writer) error {
	fs, common := newFlagSet("clean", stderr)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: clean takes no arguments", errUsage)
	}
	cfg, err := common.loadConfig(fs)
	if err != nil {
		return err
	}
	removed, err := agent.Clean(common.root, cfg)
	for _, p := range removed {
		fmt.Fprintf(stdout, "removed %s\n", p)
	}
	if err == nil {
		fmt.Fprintln(stdout, "this machine no longer belongs to an instance; the baked config and the validator stay")
	}
	return err
}

func diagnose(args []string, stdout, stderr io.Writer) error {
	fs, common := newFlagSet("diagnose", stderr)
	asJSON := fs.Bool("json", false, "print the findings as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: diagnose takes no arguments", errUsage)
	}
	cfg, err := common.loadConfig(fs)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	d := agent.Diagnose(ctx, common.root, cfg, systemd.NewLogger(stderr, common.logLevel))
	if err := output(stdout, *asJSON, d); err != nil {
		return err
	}
	if d.Failed() {
		return exitStatus(1)
	}
	return nil
}

func deregister(args []string, stdout, stderr io.Writer) error {
	fs, common := newFlagSet("deregister", stderr)
	timeout := fs.Duration("timeout", chef.DefaultDeregisterTimeout, "give up after this long")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: deregister takes no arguments", errUsage)
	}
	cfg, err := common.loadConfig(fs)
	if err != nil {
		return err
	}
	log := systemd.NewLogger(stderr, common.logLevel)
	defer func() { _ = log.Sync() }()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	d, err := agent.Deregister(ctx, common.root, cfg, log)
	if err != nil {
		if len(d.LeftBehind) > 0 {
			fmt.Fprintf(stdout, "left on the Chef server: %s\n", strings.Join(d.LeftBehind, ", "))
		}
		return err
	}
	fmt.Fprintln(stdout, "node and client deleted from the Chef server")
	return nil
}

func checkUserData(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs, common := newFlagSet("userdata check", stderr)
	asJSON := fs.Bool("json", false, "print the settings as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 1 {
		return fmt.Errorf("%w: userdata check takes one FILE or -", errUsage)
	}
	cfg, err := common.loadConfig(fs)
	if err != nil {
		return err
	}
	data, err := readInput(fs.Arg(0), stdin)
	if err != nil {
		return err
	}
	check, err := agent.CheckUserData(cfg, data)
	if err != nil {
		return err
	}
	return output(stdout, *asJSON, check)
}

// readInput reads a user-data file, or standard input for "-" or nothing,
// refusing more than the agent would ever read.
func readInput(name string, stdin io.Reader) ([]byte, error) {
	r := stdin
	if name != "" && name != "-" {
		f, err := os.Open(name)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		r = f
	}
	data, err := io.ReadAll(io.LimitReader(r, config.MaxUserDataSize+1))
	if err != nil {
		return nil, fmt.Errorf("read user-data: %w", err)
	}
	return data, nil
}
