// Command bootagent is the in-guest bootstrap agent for EC2 instances. See
// the README for the commands and docs/ARCHITECTURE.md for how the agent is
// built.
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
	"github.com/bootagent/bootagent/imdsfilter"
	"github.com/bootagent/bootagent/systemd"
)

// version is stamped at build time with -ldflags "-X main.version=...".
var version = "unknown"

const usage = `usage:
  bootagent run    [--config FILE] [--root DIR]   the daemon (systemd Type=notify)
  bootagent once   [--config FILE] [--root DIR] [--json]
                                                 one full bootstrap pass, then exit
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
  bootagent userdata check [--config FILE] [--root DIR] [--json] [FILE|-]
                                                 print what user-data would apply
  bootagent filter apply [--config FILE]          put in place the IMDS filter imds.allow_users
                                                 asks for (the early unit, before the network)
  bootagent filter remove                        open IMDS to every user again: delete the
                                                 table of imds.allow_users (package removal)
  bootagent version

The commands that take --config also take --log-level debug|info|warn|error.
bootagent(8) and bootagent.yaml(5) say more.
Exit status: 0 success, 1 runtime failure, 2 usage or invalid configuration/user-data.
`

// errUsage marks a command line that does not follow the usage.
var errUsage = errors.New("usage")

func main() {
	// Signals are caught before anything else happens: systemd may send
	// SIGTERM, SIGHUP (a reload) or SIGUSR1 at any moment, the first
	// milliseconds of the process included, and none of them may kill the
	// agent half-started. Each command then takes those it handles.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGUSR1)
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr, sigs))
}

// exitStatus is a command's exit status that is not an error: `status`
// says "in progress" with 2.
type exitStatus int

func (e exitStatus) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// run executes one command line and returns the exit status. sigs are the
// signals main caught.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer, sigs chan os.Signal) int {
	err := dispatch(args, stdin, stdout, stderr, sigs)
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

func dispatch(args []string, stdin io.Reader, stdout, stderr io.Writer, sigs chan os.Signal) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: no command given", errUsage)
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "run", "once":
		return runAgent(cmd, rest, stdout, stderr, sigs)
	case "status":
		return status(rest, stdout, stderr, sigs)
	case "deregister":
		return deregister(rest, stdout, stderr, sigs)
	case "diagnose":
		return diagnose(rest, stdout, stderr, sigs)
	}
	// The quick commands do not wait for anything: signals have their
	// default effect on them again.
	signal.Stop(sigs)
	switch cmd {
	case "clean":
		return clean(rest, stdout, stderr)
	case "filter":
		switch {
		case len(rest) > 0 && rest[0] == "apply":
			return applyFilter(rest[1:], stderr)
		case len(rest) > 0 && rest[0] == "remove":
			return removeFilter(rest[1:], stdout, stderr)
		}
		return fmt.Errorf("%w: filter takes the subcommand apply or remove", errUsage)
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
	fs, c := newConfigFlagSet(name, stderr)
	fs.StringVar(&c.root, "root", "/", "directory every system path is taken under")
	return fs, c
}

// newConfigFlagSet is newFlagSet without --root, for a command that
// touches no path of the system.
func newConfigFlagSet(name string, stderr io.Writer) (*flag.FlagSet, *commonFlags) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	c := &commonFlags{logLevel: zapcore.InfoLevel, root: "/"}
	fs.StringVar(&c.config, "config", config.DefaultPath, "config file")
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
	cfg, err := config.Load(c.config, !named)
	if err != nil {
		return cfg, err
	}
	// The SDK's own variables for the endpoint and its mode, which the
	// config file's keys win over.
	if err := cfg.FromEnvironment(os.Getenv); err != nil {
		return cfg, err
	}
	return cfg, nil
}

// watchSignals returns a context that ends on SIGINT or SIGTERM (and on
// SIGHUP, unless reload takes it), and calls reload on SIGHUP and trigger
// on SIGUSR1 when they are given. Signals that arrived before it is called
// are handled first, in order, before it returns.
func watchSignals(sigs <-chan os.Signal, reload, trigger func()) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.Background())
	handle := func(s os.Signal) {
		switch {
		case s == syscall.SIGHUP && reload != nil:
			reload()
		case s == syscall.SIGUSR1:
			if trigger != nil {
				trigger()
			}
		default:
			cancel()
		}
	}
	for pending := true; pending; {
		select {
		case s := <-sigs:
			handle(s)
		default:
			pending = false
		}
	}
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case s := <-sigs:
				handle(s)
			}
		}
	}()
	return ctx, cancel
}

func runAgent(cmd string, args []string, stdout, stderr io.Writer, sigs chan os.Signal) error {
	fs, common := newFlagSet(cmd, stderr)
	asJSON := new(bool)
	if cmd == "once" {
		fs.BoolVar(asJSON, "json", false, "print the result as JSON")
	}
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

	// The environment systemd gives is read here, and only here.
	watchdog, _ := systemd.WatchdogInterval()
	e := agent.New(context.Background(), agent.Options{
		Config: cfg, Root: common.root, Log: log, Version: version, Notifier: systemd.NewNotifier(log),
		Systemd: os.Getenv("INVOCATION_ID") != "", Watchdog: watchdog,
	})
	defer e.Close()

	if cmd == "run" {
		// SIGHUP reloads the config file; a file that does not load is
		// refused and the running configuration kept. SIGUSR1 starts a
		// chef-client run now, as it does for chef-client's own daemon.
		reload := func() {
			cfg, err := common.loadConfig(fs)
			if err != nil {
				log.Error("SIGHUP: the config does not load; keeping the running one", zap.Error(err))
				return
			}
			log.Info("SIGHUP: reloading the config", zap.String("config", common.config))
			e.Reload(cfg)
		}
		trigger := func() {
			log.Info("SIGUSR1: chef-client run requested")
			e.TriggerRun()
		}
		ctx, stop := watchSignals(sigs, reload, trigger)
		defer stop()
		return e.Run(ctx)
	}
	ctx, stop := watchSignals(sigs, nil, nil)
	defer stop()
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

func status(args []string, stdout, stderr io.Writer, sigs chan os.Signal) error {
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
	ctx, stop := watchSignals(sigs, nil, nil)
	defer stop()
	deadline := time.Now().Add(wait.limit)
	for {
		st, err := agent.ReadState(*root)
		code := agent.StatusCode(st)
		if code == 2 && wait.on && (wait.limit == 0 || time.Now().Before(deadline)) {
			// Polling the state file until it says done, or a signal.
			select {
			case <-ctx.Done():
				return exitStatus(code)
			case <-time.After(statusPoll):
			}
			continue
		}
		if err != nil {
			fmt.Fprintf(stderr, "bootagent: %v\n", err)
		}
		st.IMDSFilter = agent.ReadFilter()
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

// applyFilter puts in place the IMDS filter the config file asks for: the
// early unit's command, before the network and the daemon are up.
func applyFilter(args []string, stderr io.Writer) error {
	// No --root: the filter is the kernel's, and the config file is taken
	// as given.
	fs, common := newConfigFlagSet("filter apply", stderr)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: filter apply takes no arguments", errUsage)
	}
	cfg, err := common.loadConfig(fs)
	if err != nil {
		return err
	}
	return agent.ApplyFilter(cfg, systemd.NewLogger(stderr, common.logLevel))
}

// removeFilter deletes the IMDS filter. A daemon still running puts it
// back, so the package's removal stops the agent first.
func removeFilter(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("filter remove", flag.ContinueOnError)
	fs.SetOutput(stderr)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: filter remove takes no arguments", errUsage)
	}
	removed, err := agent.RemoveFilter()
	if err != nil {
		return err
	}
	if removed {
		fmt.Fprintf(stdout, "removed nftables table inet %s: every user reaches IMDS again\n", imdsfilter.Table)
	} else {
		fmt.Fprintf(stdout, "no nftables table inet %s: IMDS was not filtered\n", imdsfilter.Table)
	}
	return nil
}

func diagnose(args []string, stdout, stderr io.Writer, sigs chan os.Signal) error {
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
	ctx, stop := watchSignals(sigs, nil, nil)
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

func deregister(args []string, stdout, stderr io.Writer, sigs chan os.Signal) error {
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
	ctx, stop := watchSignals(sigs, nil, nil)
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
	if len(data) > config.MaxUserDataSize {
		// The rest is counted, not kept, so the error says the real size.
		rest, err := io.Copy(io.Discard, r)
		if err != nil {
			return nil, fmt.Errorf("read user-data: %w", err)
		}
		return nil, config.OversizedUserData(int64(len(data)) + rest)
	}
	return data, nil
}
