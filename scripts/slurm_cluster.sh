#!/usr/bin/env bash
# A throw-away one-node SLURM cluster on this machine, for testing the sbatch scripts in slurm/.
#
#   bash scripts/slurm_cluster.sh start    # install (apt) if missing, start munged, slurmctld, slurmd
#   eval "$(bash scripts/slurm_cluster.sh env)"   # export SLURM_CONF for sbatch/squeue/scontrol
#   bash scripts/slurm_cluster.sh status
#   bash scripts/slurm_cluster.sh stop     # cancel jobs, stop the daemons it started, remove its files
#
# Needs root, or sudo without a password (the daemons run as root; munged runs as the munge user).
# Everything it writes (slurm.conf, state, spool, logs, pid files) lives under one directory,
# HPCREFINE_SLURM_ROOT (default /tmp/hpcrefine-slurm), and the clients find the configuration through
# SLURM_CONF, so nothing in /etc/slurm is read or touched. A munged already answering on the default
# socket is reused (and left running by `stop`); otherwise one is started and `stop` stops it.
#
# Settings (environment): HPCREFINE_SLURM_ROOT, HPCREFINE_SLURM_PORT (slurmctld port, default 6817;
# slurmd uses the next one), HPCREFINE_SLURM_CRED_EXPIRE (default 5 s, the smallest slurm accepts:
# a requeued job waits about this long before it may start again; the default 120 s makes every
# requeue cost two minutes), HPCREFINE_SLURM_KILLWAIT (default 10 s between SIGTERM and SIGKILL at
# the time limit), HPCREFINE_SLURM_START_TIMEOUT (default 60 s to wait for the node to be idle).
set -uo pipefail

ROOT=${HPCREFINE_SLURM_ROOT:-/tmp/hpcrefine-slurm}
CONF=$ROOT/etc/slurm.conf
PORT=${HPCREFINE_SLURM_PORT:-6817}
CRED_EXPIRE=${HPCREFINE_SLURM_CRED_EXPIRE:-5}
KILLWAIT=${HPCREFINE_SLURM_KILLWAIT:-10}
START_TIMEOUT=${HPCREFINE_SLURM_START_TIMEOUT:-60}
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"
export SLURM_CONF=$CONF

say() { echo "slurm_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() {
  if [ -n "$SUDO" ] && ! sudo -n true 2>/dev/null; then
    die "starting a SLURM cluster needs root or passwordless sudo (slurmd must run as root); user $(id -un) has neither"
  fi
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ] || missing+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || [ -x /usr/sbin/slurmd ] || missing+=(slurmd)
  command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
  [ -x /usr/sbin/munged ] || missing+=(munge)
  [ ${#missing[@]} = 0 ] && return 0
  say "installing ${missing[*]} with apt-get"
  command -v apt-get >/dev/null 2>&1 || die "slurm is not installed and there is no apt-get: install ${missing[*]}"
  $SUDO apt-get update -qq >/dev/null || die "apt-get update failed"
  # no recommends: they pull in the -dev packages of every slurm plugin
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_works; then
    say "munged already running: using it"
    return 0
  fi
  # no systemd here: create what the munge.service unit would
  $SUDO install -d -o munge -g munge -m 0755 /run/munge
  $SUDO install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
  if ! $SUDO test -s /etc/munge/munge.key; then
    say "creating /etc/munge/munge.key"
    $SUDO sh -c 'dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none'
  fi
  $SUDO chown munge:munge /etc/munge/munge.key
  $SUDO chmod 0400 /etc/munge/munge.key
  $SUDO runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid \
    || die "munged failed to start (see /var/log/munge/munged.log)"
  $SUDO cp /run/munge/munged.pid "$ROOT/run/munged.pid"   # we started it: `stop` stops it
  for _ in $(seq 50); do munge_works && return 0; sleep 0.1; done
  die "munged started but does not answer (see /var/log/munge/munged.log)"
}

write_conf() {
  local node cpus mem line first_job
  node=$(hostname -s)
  first_job=$(( $(date +%s) % 60000000 + 1000 ))
  # what slurmd itself detects, so that the node is not drained for a mismatch
  line=$(slurmd -C 2>/dev/null | head -1)
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$line")
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
  [ -n "$cpus" ] || cpus=$(nproc)
  [ -n "$mem" ] || mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
  mem=$((mem * 95 / 100))
  $SUDO tee "$CONF" >/dev/null <<EOF
# one-node test cluster written by scripts/slurm_cluster.sh ($(date -u +%FT%TZ))
ClusterName=hpcrefine-test
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start only after the credential of its last run expired: 5 s, not 120
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no systemd, no cgroup delegation in containers: track processes through /proc, no binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=pmi2
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
# job ids that no earlier test cluster on this machine used: MPICH names its shared-memory segment
# (/dev/shm/mpich_shm_*) after the PMI job id (JOBID.STEP); a rank killed hard leaves it behind,
# and the next job with the same id finds it and never leaves MPI_Init
FirstJobId=$first_job
ReturnToService=2
KillWait=$KILLWAIT
OverTimeLimit=0
InactiveLimit=0
MinJobAge=600
SlurmdTimeout=60
SlurmctldTimeout=60
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  echo "$node"
}

pid_alive() { [ -f "$1" ] && $SUDO kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { sinfo -h -N -o %t 2>/dev/null | head -1; }

cmd_start() {
  need_root
  install_packages
  if pid_alive "$ROOT/run/slurmctld.pid"; then
    say "already running under $ROOT (stop it first)"
    cmd_status
    return 0
  fi
  local t0=$SECONDS node p
  for p in "$PORT" $((PORT + 1)); do
    # another slurm (or anything) on our ports would answer our clients in place of our daemons
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      die "port $p is in use (another slurmctld/slurmd?): choose others with HPCREFINE_SLURM_PORT"
    fi
  done
  $SUDO rm -rf "$ROOT"
  $SUDO mkdir -p "$ROOT/etc" "$ROOT/state" "$ROOT/spool" "$ROOT/log" "$ROOT/run"
  $SUDO chmod 0755 "$ROOT" "$ROOT/etc" "$ROOT/log"
  start_munge
  node=$(write_conf)
  # -i: ignore state from an earlier cluster; SLURM_CONF passes through sudo with `env`
  $SUDO env SLURM_CONF="$CONF" slurmctld -i || die "slurmctld failed to start: $(tail -5 "$ROOT/log/slurmctld.log" 2>/dev/null)"
  $SUDO env SLURM_CONF="$CONF" slurmd -N "$node" || die "slurmd failed to start: $(tail -5 "$ROOT/log/slurmd.log" 2>/dev/null)"
  local state=""
  while [ $((SECONDS - t0)) -lt "$START_TIMEOUT" ]; do
    state=$(node_state)
    # idle, and reported by our slurmctld (not one of another cluster on the same port)
    if [ "$state" = idle ] && pid_alive "$ROOT/run/slurmctld.pid" && pid_alive "$ROOT/run/slurmd.pid" &&
       scontrol show config 2>/dev/null | grep -q "^StateSaveLocation *= *$ROOT/state\$"; then
      break
    fi
    state="${state:-not answering}, or not our daemons"
    sleep 0.5
  done
  if [ "$state" != idle ]; then
    say "node $node is '$state' after ${START_TIMEOUT}s; logs:"
    tail -20 "$ROOT/log/slurmctld.log" "$ROOT/log/slurmd.log" >&2 2>/dev/null
    exit 1
  fi
  say "node $node idle after $((SECONDS - t0)) s; export SLURM_CONF=$CONF"
}

cmd_stop() {
  # every step may fail (a start that stopped half way): carry on regardless
  if [ -f "$CONF" ] && pid_alive "$ROOT/run/slurmctld.pid"; then
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs $jobs"
      # shellcheck disable=SC2086
      $SUDO env SLURM_CONF="$CONF" scancel --full $jobs 2>/dev/null
      for _ in $(seq 40); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  local d pid
  for d in slurmd slurmctld munged; do
    [ -f "$ROOT/run/$d.pid" ] || continue
    pid=$(cat "$ROOT/run/$d.pid")
    if [ -n "$pid" ] && $SUDO kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do $SUDO kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      $SUDO kill -9 "$pid" 2>/dev/null
      say "stopped $d ($pid)"
    fi
  done
  # job steps that outlived slurmd (their slurmstepd names our spool directory in its cwd)
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = /usr/sbin/slurmstepd ] || continue
    case "$(readlink "/proc/$pid/cwd" 2>/dev/null)" in
      "$ROOT"/*) $SUDO kill -9 "$pid" 2>/dev/null && say "killed leftover slurmstepd $pid" ;;
    esac
  done
  [ -n "$ROOT" ] && [ "$ROOT" != / ] && $SUDO rm -rf "$ROOT"
  # what an epilog does on a real cluster: MPICH segments of ranks killed hard, mapped by no process
  local f
  for f in /dev/shm/mpich_shm_*; do
    [ -e "$f" ] || continue
    grep -qsF "$f" /proc/[0-9]*/maps || { $SUDO rm -f "$f" && say "removed stale $f"; }
  done
  return 0
}

cmd_status() {
  if ! [ -f "$CONF" ]; then echo "no cluster under $ROOT"; return 1; fi
  local d rc=0
  for d in munged slurmctld slurmd; do
    if pid_alive "$ROOT/run/$d.pid"; then echo "$d: running ($(cat "$ROOT/run/$d.pid"))"
    elif [ $d = munged ] && munge_works; then echo "munged: running (not ours)"
    else echo "$d: not running"; rc=1; fi
  done
  echo "SLURM_CONF=$CONF"
  sinfo 2>&1 && squeue 2>&1
  return $rc
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 {start|stop|status|env}" >&2; exit 2 ;;
esac
