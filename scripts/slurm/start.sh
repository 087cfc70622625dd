#!/bin/bash
# A real single-node SLURM with accounting, for the `slurm` tests and for trying `hydra/launcher=slurm`:
#   sudo bash scripts/slurm/start.sh     # apt-installs if needed (Debian/Ubuntu slurm-wlm), starts
#                                        # munged, mariadbd, slurmdbd, slurmctld, slurmd; waits for `sinfo`
#   bash scripts/slurm/stop.sh           # stops them again
# Idempotent: what is already running is left running. Needs root, no systemd, no cgroups.
# ACCOUNTING=0 skips MariaDB + slurmdbd (faster, but `sacct` fails and submitit cannot see a killed job).
# Everything runs on loopback as root; state and logs go to /tmp/slurm (logs: /tmp/slurm/log/).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ACCOUNTING=${ACCOUNTING:-1}
[ "$(id -u)" = 0 ] || { echo "start.sh: needs root" >&2; exit 1; }

PKGS="slurmctld slurmd slurm-client munge"
[ "$ACCOUNTING" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
if ! command -v slurmctld >/dev/null || { [ "$ACCOUNTING" = 1 ] && ! command -v slurmdbd >/dev/null; }; then
  echo "start.sh: installing $PKGS"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PKGS >/dev/null
fi

mkdir -p /tmp/slurm/{state,spool,log} /etc/slurm
CPUS=$(nproc)
MEMORY=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
if [ "$ACCOUNTING" = 1 ]; then
  ACC='AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nAccountingStoragePort=6819'
else
  ACC='AccountingStorageType=accounting_storage/none'
fi
sed -e "s#@CPUS@#$CPUS#" -e "s#@MEMORY@#$MEMORY#" -e "s#^@ACCOUNTING@#$ACC#" "$HERE/slurm.conf" > /etc/slurm/slurm.conf

# munge: the package's postinst makes the key; make one if it is missing.
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done

if [ "$ACCOUNTING" = 1 ]; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  if ! pgrep -x mariadbd >/dev/null; then
    nohup /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
      --bind-address=127.0.0.1 --pid-file=/run/mysqld/mariadb.pid --log-error=/run/mysqld/mariadb.err >/dev/null 2>&1 &
  fi
  for _ in $(seq 100); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  install -m 600 "$HERE/slurmdbd.conf" /etc/slurm/slurmdbd.conf
  pgrep -x slurmdbd >/dev/null || /usr/sbin/slurmdbd
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.2; done
fi

pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd -N localhost
for i in $(seq 150); do
  state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
  case "$state" in
    idle|mixed|allocated) break ;;
    drain*|down*|inval*) scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
  esac
  sleep 0.2
done
sinfo
if [ "$ACCOUNTING" = 1 ]; then
  for _ in $(seq 50); do sacct -n -X -S now >/dev/null 2>&1 && break; sleep 0.2; done
  sacct -n -X -S now >/dev/null && echo "start.sh: SLURM with accounting is up"
fi
