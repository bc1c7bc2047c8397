// Command ferretdb runs FerretDB's embeddable server as a standalone process.
//
// stockflow builds this file (with the go.mod and go.sum beside it) instead of the upstream
// cmd/ferretdb, whose version file is generated at release time and is not part of the Go
// module: a plain `go install` of it panics at start. The flags mirror upstream's names.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

const module = "github.com/FerretDB/FerretDB"

// moduleVersion returns the FerretDB module version compiled into this binary.
func moduleVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	for _, dep := range info.Deps {
		if dep.Path == module {
			return dep.Version
		}
	}
	return "unknown"
}

func main() {
	listen := flag.String("listen-addr", "127.0.0.1:27017", "TCP address to listen on")
	handler := flag.String("handler", "sqlite", "backend handler: sqlite or postgresql")
	sqliteURL := flag.String("sqlite-url", "", "SQLite directory URL, such as file:/abs/dir/ (must end with /)")
	pgURL := flag.String("postgresql-url", "", "PostgreSQL URL, such as postgres://127.0.0.1:5432/ferretdb")
	logLevel := flag.String("log-level", "info", "debug, info, warn or error")
	showVersion := flag.Bool("version", false, "print the FerretDB version and exit")
	flag.Parse()

	if *showVersion {
		fmt.Printf("FerretDB %s (embedded)\n", moduleVersion())
		return
	}

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "invalid --log-level %q: %v\n", *logLevel, err)
		os.Exit(2)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	f, err := ferretdb.New(&ferretdb.Config{
		Listener:      ferretdb.ListenerConfig{TCP: *listen},
		Logger:        logger,
		Handler:       *handler,
		SQLiteURL:     *sqliteURL,
		PostgreSQLURL: *pgURL,
	})
	if err != nil {
		logger.Error("cannot start FerretDB", "error", err)
		os.Exit(1)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	logger.Info("FerretDB started", "version", moduleVersion(), "listen", *listen, "handler", *handler)
	if err := f.Run(ctx); err != nil {
		logger.Error("FerretDB stopped with an error", "error", err)
		os.Exit(1)
	}
	logger.Info("FerretDB stopped")
}
