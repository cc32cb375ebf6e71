#!/usr/bin/env bash
# PostgreSQL side of the Harbor write benchmark.
#
# Starts a throwaway primary + synchronous streaming standby on loopback
# (every commit fsynced on the primary and flushed on the standby: Harbor's
# durability), loads the reservation schema, runs pgbench for each
# mode x workload x client count, and prints tps and exact p50/p99 latency.
#
# Usage: bench/postgres/run.sh [--quick] [--out FILE] ...   (see --help)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)

# ---------------------------------------------------------------- defaults
PRIMARY_PORT=${PG_PRIMARY_PORT:-54330}
STANDBY_PORT=${PG_STANDBY_PORT:-54331}
STANDBY_NAME=harbor_standby
DB=harbor_bench
RUN_SECONDS=60
CLIENTS="1 16 64"
MODES="interactive function"
WORKLOADS="uniform hot"
ISSUERS=1000
HOT=10
OUT=""
KEEP=0
WAIT_FOR_BUILDS=1

# State the EXIT trap needs.
WORK=""
PRIMARY_STARTED=0
STANDBY_STARTED=0
PGBENCH_PID=""
SAMPLER_PID=""
PGBIN=""

usage() {
    cat <<EOF
Usage: $(basename "$0") [options]

Benchmarks PostgreSQL (primary + synchronous standby on 127.0.0.1) on
Harbor's reservation transaction with pgbench.

Options:
  --quick              10 s per row (whole default matrix in about 3 minutes)
  --seconds S          seconds per row (default $RUN_SECONDS)
  --clients "LIST"     client counts (default "$CLIENTS")
  --modes "LIST"       interactive and/or function (default "$MODES")
  --workloads "LIST"   uniform and/or hot (default "$WORKLOADS")
  --issuers N          issuers for the uniform workload (default $ISSUERS)
  --hot K              issuers for the hot workload (default $HOT)
  --out FILE           also write one JSON line per row to FILE
  --keep               keep the data directory and logs (printed at exit)
  --no-wait            do not wait for cargo/rustc to finish before each row
  -h, --help           this help

Environment: PG_PRIMARY_PORT (default 54330), PG_STANDBY_PORT (default 54331),
TMPDIR (where the temporary data directory goes; it must be a real disk,
not tmpfs, or fsync means nothing).
EOF
}

log() { printf '[pg-bench] %s\n' "$*" >&2; }
die() { printf 'run.sh: error: %s\n' "$*" >&2; exit 1; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# ---------------------------------------------------------------- flags
parse_args() {
    while (($#)); do
        case $1 in
            --quick) RUN_SECONDS=10 ;;
            --seconds) need_value "$@"; RUN_SECONDS=$2; shift ;;
            --clients) need_value "$@"; CLIENTS=$2; shift ;;
            --modes) need_value "$@"; MODES=$2; shift ;;
            --workloads) need_value "$@"; WORKLOADS=$2; shift ;;
            --issuers) need_value "$@"; ISSUERS=$2; shift ;;
            --hot) need_value "$@"; HOT=$2; shift ;;
            --out) need_value "$@"; OUT=$2; shift ;;
            --keep) KEEP=1 ;;
            --no-wait) WAIT_FOR_BUILDS=0 ;;
            -h | --help) usage; exit 0 ;;
            *) die "unknown option '$1' (see --help)" ;;
        esac
        shift
    done

    require_positive --seconds "$RUN_SECONDS"
    require_positive --issuers "$ISSUERS"
    require_positive --hot "$HOT"
    is_uint "$PRIMARY_PORT" || die "PG_PRIMARY_PORT must be a port number, got '$PRIMARY_PORT'"
    is_uint "$STANDBY_PORT" || die "PG_STANDBY_PORT must be a port number, got '$STANDBY_PORT'"
    [[ $PRIMARY_PORT != "$STANDBY_PORT" ]] || die "primary and standby need distinct ports"
    local c m w
    [[ -n ${CLIENTS// /} ]] || die "--clients is empty"
    for c in $CLIENTS; do
        if ! is_uint "$c" || ((c < 1 || c > 190)); then
            die "--clients: '$c' is not a client count in 1..190 (max_connections is 200)"
        fi
    done
    [[ -n ${MODES// /} ]] || die "--modes is empty"
    for m in $MODES; do
        [[ $m == interactive || $m == function ]] || die "--modes: unknown mode '$m' (interactive, function)"
    done
    [[ -n ${WORKLOADS// /} ]] || die "--workloads is empty"
    for w in $WORKLOADS; do
        [[ $w == uniform || $w == hot ]] || die "--workloads: unknown workload '$w' (uniform, hot)"
    done
    if [[ -n $OUT ]]; then
        : >"$OUT" 2>/dev/null || die "--out: cannot write '$OUT'"
    fi
}

need_value() {
    if (($# < 2)) || [[ $2 == --* ]]; then die "$1 needs a value"; fi
}

require_positive() {
    if ! is_uint "$2" || (($2 == 0)); then die "$1 wants a positive integer, got '$2'"; fi
}

# ---------------------------------------------------------------- setup
# Run a command as the database owner: PostgreSQL refuses to run as root.
as_pg() {
    if ((EUID == 0)); then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Debian's packages put the server binaries in /usr/lib/postgresql/<ver>/bin.
find_pgbin() {
    local dirs
    dirs=$(compgen -G '/usr/lib/postgresql/*/bin/postgres' | sort -V | tail -n 1 || true)
    [[ -n $dirs ]] && dirname "$dirs"
}

install_postgres() {
    ((EUID == 0)) || die "PostgreSQL is not installed; run as root or: sudo apt-get install -y postgresql postgresql-contrib"
    log "installing PostgreSQL (apt-get install -y postgresql postgresql-contrib)"
    # Debian's postinst would start the system-wide cluster; we only want the
    # binaries, so deny service starts for the duration of the install.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql postgresql-contrib >&2 || rc=$?
    ((made_policy)) && rm -f "$policy"
    ((rc == 0)) || die "apt-get install failed (exit $rc)"
}

setup_binaries() {
    PGBIN=$(find_pgbin || true)
    if [[ -z $PGBIN ]]; then
        install_postgres
        PGBIN=$(find_pgbin || true)
        [[ -n $PGBIN ]] || die "PostgreSQL installed but no /usr/lib/postgresql/*/bin/postgres found"
    fi
    local b
    for b in initdb pg_ctl pg_basebackup postgres pgbench psql; do
        [[ -x $PGBIN/$b ]] || die "$PGBIN/$b is missing (apt-get install -y postgresql postgresql-contrib)"
    done
    if ((EUID == 0)); then
        id -u postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to run the servers"
    fi
    command -v python3 >/dev/null || die "python3 is needed for the latency percentiles"
}

port_in_use() {
    # A successful connect means something already listens there.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

psql_p() {
    PGOPTIONS="-c client_min_messages=warning" "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres "$@"
}

start_cluster() {
    local p
    for p in "$PRIMARY_PORT" "$STANDBY_PORT"; do
        ! port_in_use "$p" || die "port $p on 127.0.0.1 is in use (set PG_PRIMARY_PORT / PG_STANDBY_PORT)"
    done

    WORK=$(mktemp -d "${TMPDIR:-/tmp}/harbor-pgbench.XXXXXX")
    [[ $WORK != *[[:space:]]* ]] || die "temporary directory '$WORK' contains spaces; set TMPDIR"
    if [[ $(stat -f -c %T "$WORK") == tmpfs ]]; then
        log "WARNING: $WORK is on tmpfs: fsync is free there and the numbers are not comparable"
    fi
    mkdir -p "$WORK/runs"
    ((EUID == 0)) && chown postgres: "$WORK"
    local primary=$WORK/primary standby=$WORK/standby

    log "initdb in $WORK ($("$PGBIN/postgres" --version))"
    as_pg "$PGBIN/initdb" -D "$primary" -U postgres --auth=trust -E UTF8 --locale=C \
        --no-instructions -N >"$WORK/initdb.log"
    {
        cat "$HERE/postgresql.conf"
        echo "# added by run.sh"
        echo "synchronous_standby_names = '$STANDBY_NAME'"
    } >>"$primary/postgresql.conf"

    # Sockets go to our own directory: no clash with a system cluster.
    log "starting primary on 127.0.0.1:$PRIMARY_PORT"
    as_pg "$PGBIN/pg_ctl" -D "$primary" -l "$WORK/primary.log" -w -t 60 \
        -o "-c port=$PRIMARY_PORT -c unix_socket_directories=$WORK" start >/dev/null
    PRIMARY_STARTED=1

    log "pg_basebackup -> standby"
    as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres \
        -D "$standby" -X stream -c fast -N
    as_pg touch "$standby/standby.signal"
    # application_name is what synchronous_standby_names matches.
    echo "primary_conninfo = 'host=127.0.0.1 port=$PRIMARY_PORT user=postgres application_name=$STANDBY_NAME'" |
        as_pg tee -a "$standby/postgresql.auto.conf" >/dev/null

    log "starting standby on 127.0.0.1:$STANDBY_PORT"
    as_pg "$PGBIN/pg_ctl" -D "$standby" -l "$WORK/standby.log" -w -t 60 \
        -o "-c port=$STANDBY_PORT -c unix_socket_directories=$WORK" start >/dev/null
    STANDBY_STARTED=1

    # Measure nothing until commits really wait for the standby.
    local i state=""
    for ((i = 0; i < 120; i++)); do
        state=$(psql_p -d postgres -c \
            "SELECT state || '/' || sync_state FROM pg_stat_replication WHERE application_name = '$STANDBY_NAME'" || true)
        [[ $state == streaming/sync ]] && break
        sleep 0.5
    done
    [[ $state == streaming/sync ]] || die "standby not streaming synchronously after 60 s (state '$state'); see $WORK/*.log"
    log "standby is streaming, sync_state = sync"
}

load_data() {
    local n=$ISSUERS
    ((HOT > n)) && n=$HOT
    psql_p -d postgres -c "CREATE DATABASE $DB"
    psql_p -d "$DB" -f "$HERE/schema.sql" >/dev/null
    psql_p -d "$DB" -v issuers="$n" -f "$HERE/load.sql" >/dev/null
    log "loaded schema and $n issuers (ISS-0 .. ISS-$((n - 1)))"
}

# ---------------------------------------------------------------- builds
# Another engineer compiles on this 2-core box; a concurrent build would
# halve our numbers. Wait for it, and flag rows it overlapped.
build_running() {
    pgrep -x cargo >/dev/null || pgrep -x rustc >/dev/null
}

wait_for_quiet() {
    ((WAIT_FOR_BUILDS)) || return 0
    local said=0
    while build_running; do
        ((said)) || log "cargo/rustc is running; waiting for it to finish (polling every 30 s)"
        said=1
        sleep 30
    done
}

# Background loop: touch $1 whenever a build is seen.
sample_builds() {
    while :; do
        if build_running; then : >"$1"; fi
        sleep 1
    done
}

# ---------------------------------------------------------------- one row
# run_row MODE WORKLOAD CLIENTS -> appends a JSON line to $WORK/results.jsonl
run_row() {
    local mode=$1 workload=$2 clients=$3
    local nissuers label threads
    if [[ $workload == uniform ]]; then
        nissuers=$ISSUERS label="uniform issuers $ISSUERS"
    else
        nissuers=$HOT label="hot $HOT"
    fi
    threads=$((clients < 2 ? clients : 2))

    local attempt dir rc disturbed
    for attempt in 1 2 3; do
        wait_for_quiet
        dir=$WORK/runs/$mode-$workload-c$clients-a$attempt
        mkdir -p "$dir/log"
        psql_p -d "$DB" -f "$HERE/reset.sql" >/dev/null

        # run = nanosecond clock: tokens "<run>-<client>-<seq>" are unique
        # across rows and attempts too.
        local cmd=("$PGBIN/pgbench" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres
            -n -M prepared -c "$clients" -j "$threads" -T "$RUN_SECONDS"
            -f "$HERE/$mode.pgbench"
            -D nissuers="$nissuers" -D run="$(date +%s%N)" -D seq=0
            -l --log-prefix="$dir/log/tx" "$DB")

        log "$mode, $label, $clients clients, $RUN_SECONDS s ..."
        sample_builds "$dir/build-seen" &
        SAMPLER_PID=$!
        # In the background so a signal reaches our trap right away.
        "${cmd[@]}" >"$dir/stdout" 2>"$dir/stderr" &
        PGBENCH_PID=$!
        rc=0
        wait "$PGBENCH_PID" || rc=$?
        PGBENCH_PID=""
        kill "$SAMPLER_PID" 2>/dev/null || true
        wait "$SAMPLER_PID" 2>/dev/null || true
        SAMPLER_PID=""

        disturbed=0
        [[ -e $dir/build-seen ]] && disturbed=1
        if ((disturbed && WAIT_FOR_BUILDS && attempt < 3)); then
            log "a build ran during this row; running it again"
            continue
        fi
        break
    done

    if ((rc != 0)); then
        log "pgbench exited with $rc; its stderr:"
        sed 's/^/    /' "$dir/stderr" >&2
        [[ -s $dir/stdout ]] || die "pgbench produced no results (see above)"
    fi

    # Cross-check pgbench against the database itself.
    local check reservations consistent
    check=$(psql_p -d "$DB" -f "$HERE/check.sql")
    reservations=${check%%|*}
    consistent=${check##*|}

    # Record the command with paths that mean something on another machine.
    local shown=${cmd[*]}
    [[ -z ${PGOPTIONS:-} ]] || shown="PGOPTIONS='$PGOPTIONS' $shown"
    shown=${shown//"$HERE"/bench/postgres}
    shown=${shown//"$WORK"/\$WORK}
    shown=${shown//"$PGBIN/"/}

    local extra=()
    ((disturbed)) && extra+=(--disturbed)
    python3 "$HERE/report.py" row --logdir "$dir/log" --stdout "$dir/stdout" --stderr "$dir/stderr" \
        --mode "$mode" --workload "$label" --issuers "$nissuers" --clients "$clients" \
        --threads "$threads" --seconds "$RUN_SECONDS" --exit-code "$rc" \
        --reservations "$reservations" --consistent "$consistent" "${extra[@]}" \
        --pg-version "$PG_VERSION" --date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        --command "$shown" >"$dir/result.json"
    cat "$dir/result.json" >>"$WORK/results.jsonl"
    [[ -z $OUT ]] || cat "$dir/result.json" >>"$OUT"
    # The per-transaction logs are large; keep them only with --keep.
    ((KEEP)) || rm -rf "$dir/log"
}

# ---------------------------------------------------------------- cleanup
cleanup() {
    local rc=$?
    set +e
    [[ -n $PGBENCH_PID ]] && kill "$PGBENCH_PID" 2>/dev/null && wait "$PGBENCH_PID" 2>/dev/null
    [[ -n $SAMPLER_PID ]] && kill "$SAMPLER_PID" 2>/dev/null
    # Primary first: a fast shutdown sends its last WAL to the standby.
    if ((PRIMARY_STARTED)); then
        as_pg "$PGBIN/pg_ctl" -D "$WORK/primary" -m fast -w -t 60 stop >/dev/null 2>&1 ||
            as_pg "$PGBIN/pg_ctl" -D "$WORK/primary" -m immediate stop >/dev/null 2>&1
    fi
    if ((STANDBY_STARTED)); then
        as_pg "$PGBIN/pg_ctl" -D "$WORK/standby" -m fast -w -t 60 stop >/dev/null 2>&1 ||
            as_pg "$PGBIN/pg_ctl" -D "$WORK/standby" -m immediate stop >/dev/null 2>&1
    fi
    if [[ -n $WORK ]]; then
        if ((KEEP)); then
            log "kept $WORK (servers stopped; logs and per-transaction files under runs/)"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}

# ---------------------------------------------------------------- main
main() {
    parse_args "$@"
    setup_binaries
    PG_VERSION=$("$PGBIN/postgres" --version | awk '{print $3}')
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    # libpq passes PGOPTIONS to every pgbench session: it could quietly turn
    # off synchronous commit, so say so loudly (it is also in the JSON).
    [[ -z ${PGOPTIONS:-} ]] || log "WARNING: PGOPTIONS='$PGOPTIONS' applies to the pgbench sessions"

    local started=$SECONDS
    start_cluster
    load_data

    local mode workload clients
    for mode in $MODES; do
        for workload in $WORKLOADS; do
            for clients in $CLIENTS; do
                run_row "$mode" "$workload" "$clients"
            done
        done
    done

    echo
    echo "PostgreSQL $PG_VERSION, primary + synchronous standby on 127.0.0.1, $(nproc) cores," \
        "$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $RUN_SECONDS s per row"
    echo
    python3 "$HERE/report.py" table "$WORK/results.jsonl"
    echo
    log "done in $((SECONDS - started)) s${OUT:+; JSON lines in $OUT}"
}

main "$@"
