# Runs inside the test-bed guest (see benches/dlm.rs): brings up corosync and
# dlm_controld for a one-node cluster, then the same local lock+unlock workload on the
# kernel DLM (libdlm) and on tandem's DLM. Results go to /out.
set -u
log() { echo "[$(awk '{print $1}' /proc/uptime)] $*"; }
mkdir -p /dev/shm /dev/misc
mountpoint -q /dev/shm || mount -t tmpfs shm /dev/shm
modprobe configfs
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
modprobe dlm || { echo "BENCH-FAIL no dlm module"; exit 1; }
# No udev: libdlm opens /dev/misc/<name>; devtmpfs creates /dev/<name>.
for d in dlm-control dlm-monitor dlm_plock dlm_tandembench; do ln -sf ../$d /dev/misc/$d; done
ip link set lo up
modprobe dummy
ip link add dum0 type dummy
ip addr add 192.0.2.1/24 dev dum0
ip link set dum0 up
mkdir -p /etc/corosync /var/lib/corosync /var/log/corosync /var/run/dlm_controld /var/log/dlm_controld
cat > /etc/corosync/corosync.conf <<C
totem {
  version: 2
  cluster_name: tbench
  transport: knet
  crypto_cipher: none
  crypto_hash: none
}
logging {
  to_stderr: no
  to_logfile: yes
  logfile: /var/log/corosync/corosync.log
  to_syslog: no
}
quorum {
  provider: corosync_votequorum
  expected_votes: 1
}
nodelist {
  node {
    ring0_addr: 192.0.2.1
    name: node1
    nodeid: 1
  }
}
C
corosync || { echo "BENCH-FAIL corosync"; cat /var/log/corosync/corosync.log; exit 1; }
for i in $(seq 1 60); do corosync-quorumtool -s 2>/dev/null | grep -q 'Quorate: *Yes' && break; sleep 1; done
corosync-quorumtool -s | grep -q 'Quorate: *Yes' || { echo "BENCH-FAIL no quorum"; exit 1; }
dlm_controld --enable_fencing 0 --enable_startup_fencing 0 -r tcp
for i in $(seq 1 60); do dlm_tool status 2>/dev/null | grep -q 'quorate 1' && break; sleep 1; done
log "cluster up"; dlm_tool status | head -3
"$BENCH" kernel --ops "$KERNEL_OPS" > /out/kernel.txt 2> /out/kernel.err || { echo "BENCH-FAIL kernel"; cat /out/kernel.err; exit 1; }
"$BENCH" local --ops "$TANDEM_OPS" > /out/tandem.txt 2> /out/tandem.err || { echo "BENCH-FAIL tandem"; cat /out/tandem.err; exit 1; }
cat /out/kernel.txt /out/tandem.txt
echo BENCH-DONE
