#!/bin/bash
# Stops what start.sh started, by the PIDs in their pid files; cancels this node's jobs first.
stop() { [ -s "$1" ] || return 0; local p; p=$(cat "$1"); kill "$p" 2>/dev/null || return 0
         for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done; kill -9 "$p" 2>/dev/null; }
scancel --user="$(id -un)" 2>/dev/null || true
stop /tmp/slurm/slurmd.pid
stop /tmp/slurm/slurmctld.pid
stop /tmp/slurm/slurmdbd.pid
stop /run/mysqld/mariadb.pid
stop /run/munge/munged.pid
left=$(for n in slurmctld slurmd slurmdbd mariadbd munged; do pgrep -a -x $n; done); echo "${left:-all stopped}"
