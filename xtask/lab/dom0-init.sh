#!/bin/sh
# /init of the Xen lab's dom0 (`cargo xtask xen-lab`, see xtask/src/xenlab.rs).
#
# Brings up the Xen toolstack, starts host-proxy, runs each scenario's guest domain with
# `xl create`, relays its console to ours as "[domU] ..." lines and prints "VGPU-LAB ..."
# markers that the host side turns into PASS/FAIL. Markers are single lines:
#   VGPU-LAB <event> [key=value ...] uptime=<dom0 seconds>
#   VGPU-LAB-DONE
# The lab's settings come from /etc/vgpu-lab/lab.conf, the scenarios (one a line:
# name domain-name xl-config timeout-seconds expected-exit-status) from
# /etc/vgpu-lab/scenarios; both are written by the host side.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin:/usr/lib/xen-4.17/bin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm

VGPU_LAB_SHELL=0
VGPU_LAB_KEEP_GOING=0
HOST_PROXY_SOCKET=/tmp/xen-vgpu/host-proxy.sock
. /etc/vgpu-lab/lab.conf

up() { cut -d' ' -f1 /proc/uptime; }
mark() { echo "VGPU-LAB $* uptime=$(up)"; }
since() { awk -v a="$(up)" -v b="$1" 'BEGIN { printf "%.1f", a - b }'; }

finish() {
    echo "VGPU-LAB-DONE"
    if [ "$VGPU_LAB_SHELL" = 1 ]; then
        echo "dom0 shell: xl list, xl create /usr/share/vgpu-guest/<scenario>/<name>.cfg, xl console <name>;"
        echo "guest consoles in /var/log/xen/console/; host-proxy log /var/log/host-proxy.log."
        echo "Leave with 'reboot -f' (or Ctrl-a x)."
        exec setsid cttyhack sh -l
    fi
    sync
    reboot -f
    sleep 10
}

setup_failed() {
    mark "setup-failed what=$1"
    finish
}

mark "dom0-init kernel=$(uname -r) hypervisor=$(cat /sys/hypervisor/type 2>/dev/null)"

KV=$(uname -r)
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs; do
    ko=/lib/modules/$KV/$m.ko
    [ -e "$ko" ] || continue   # built in
    insmod "$ko" || mark "insmod-failed module=$m"
done
mkdir -p /proc/xen
mount -t xenfs xenfs /proc/xen || setup_failed "mount-xenfs"
for n in privcmd evtchn gntdev xenbus; do
    [ -e /dev/xen/$n ] || setup_failed "missing-/dev/xen/$n"
done

xenstored --pid-file /run/xenstored.pid || setup_failed xenstored
xen-init-dom0 >/var/log/xen-init-dom0.log 2>&1 || { cat /var/log/xen-init-dom0.log; setup_failed xen-init-dom0; }
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console || setup_failed xenconsoled
mark "xen-ready"

# host-proxy with its embedded default configuration (the simulated GPU test double) and
# its Prometheus endpoint on loopback (scraped once after the scenarios).
ip link set lo up || mark "loopback-failed"
METRICS=127.0.0.1:9464
{ host-proxy default-config; echo "metrics_listen = \"$METRICS\""; } >/etc/host-proxy.toml
# start_host_proxy: starts the daemon (pid in HP) and waits (bounded) for its admin socket.
start_host_proxy() {
    host-proxy serve --config /etc/host-proxy.toml >/var/log/host-proxy.log 2>&1 &
    HP=$!
    i=0
    while [ $i -lt 100 ] && kill -0 $HP 2>/dev/null && [ ! -S "$HOST_PROXY_SOCKET.admin" ]; do
        sleep 0.1
        i=$((i + 1))
    done
}
start_host_proxy
host_proxy_state() {
    if kill -0 $HP 2>/dev/null && [ -S "$HOST_PROXY_SOCKET.admin" ]; then echo alive; else echo dead; fi
}
HP_STATE=$(host_proxy_state)
mark "host-proxy=$HP_STATE pid=$HP socket=$HOST_PROXY_SOCKET"
[ "$HP_STATE" = alive ] || sed 's/^/[host-proxy] /' /var/log/host-proxy.log

# Prints the guest console lines from line $RELAYED+1 on, "[domU] "-prefixed; with "all",
# also a last line without its newline.
relay() {
    if [ "$2" = all ]; then last='$'; else last=$(wc -l <"$1"); fi
    [ "$last" = '$' ] || [ "$last" -gt "$RELAYED" ] || return 0
    sed -n "$((RELAYED + 1)),${last}{s/^/[domU] /;p}" "$1" | tr -d '\r'
    [ "$last" = '$' ] || RELAYED=$last
}

# host_proxy_worker_pids: the pids of the `host-proxy worker` processes (dom0 has no pgrep).
host_proxy_worker_pids() {
    for f in /proc/[0-9]*/cmdline; do
        case "$(tr '\0' ' ' <"$f" 2>/dev/null)" in *"host-proxy worker "*) f=${f#/proc/}; echo "${f%/cmdline}" ;; esac
    done
}

# restart_host_proxy NAME: kills host-proxy (SIGKILL: no shutdown path runs), counts which of
# the old daemon's workers are left after a bounded wait (they die with it:
# PR_SET_PDEATHSIG), keeps its log as host-proxy.killed.log and starts a new daemon on the
# same socket.
restart_host_proxy() {
    old=$(host_proxy_worker_pids)
    mark "scenario=$1 workers-before-kill=$(echo $old | wc -w)"
    kill -KILL $HP
    wait $HP 2>/dev/null
    n=0
    while :; do
        left=0
        # A zombie (reparented to this init, not reaped yet) has an empty cmdline: gone.
        for p in $old; do
            case "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)" in *"host-proxy worker "*) left=$((left + 1)) ;; esac
        done
        [ $left = 0 ] || [ $n -ge 20 ] && break
        sleep 0.1
        n=$((n + 1))
    done
    mv /var/log/host-proxy.log /var/log/host-proxy.killed.log
    start_host_proxy
    mark "scenario=$1 host-proxy-restarted=$(host_proxy_state) old-workers=$left pid=$HP"
}

# run_scenario NAME DOMAIN CONFIG TIMEOUT EXPECTED-STATUS DESTROY-ON SHUTDOWN-ON RESTART-ON;
# fails when the guest did not exit with the expected status. With DESTROY-ON (not "-"): when
# the guest console shows that line, the domain is destroyed, and the scenario passes when
# host-proxy ends its zone. With SHUTDOWN-ON, dom0 asks the domain to shut down at that line;
# with RESTART-ON, it kills and restarts host-proxy there.
run_scenario() {
    name=$1 dom=$2 cfg=$3 tmo=$4 want=$5 destroy_on=$6 shutdown_on=$7 restart_on=$8
    asked=0
    log=/var/log/xen/console/guest-$dom.log
    mark "scenario=$name begin domain=$dom config=$cfg"
    : >"$log"
    RELAYED=0
    t0=$(up)
    if ! xl create "$cfg" 'on_poweroff="preserve"' 'on_crash="preserve"'; then
        relay "$log" all
        mark "scenario=$name xl-create-failed"
        mark "scenario=$name end"
        return 1
    fi
    domid=$(xl domid "$dom" 2>/dev/null)
    mark "scenario=$name created domid=$domid after=$(since "$t0")"
    # A workload named in xenstore (the guest agent waits for it, bounded).
    if [ -e "/etc/vgpu-lab/$name.xenstore-run" ]; then
        xenstore-write "/local/domain/$domid/vgpu/run" "$(cat "/etc/vgpu-lab/$name.xenstore-run")" ||
            mark "scenario=$name xenstore-write-failed"
    fi
    # Wait (bounded) for the domain to shut down (s) or crash (c); relay its console meanwhile.
    how=timeout
    n=0
    while [ $n -lt $((tmo * 4)) ]; do
        st=$(xl list "$dom" 2>/dev/null | awk 'NR == 2 { print $5 }')
        if [ "$shutdown_on" != - ] && [ $asked = 0 ] && grep -q "$shutdown_on" "$log" 2>/dev/null; then
            mark "scenario=$name xl-shutdown"
            xl shutdown "$dom" || mark "scenario=$name xl-shutdown-failed"
            asked=1
        fi
        if [ "$restart_on" != - ] && [ $asked = 0 ] && grep -q "$restart_on" "$log" 2>/dev/null; then
            relay "$log"
            restart_host_proxy "$name"
            asked=1
        fi
        if [ "$destroy_on" != - ] && grep -q "$destroy_on" "$log" 2>/dev/null; then
            relay "$log"
            # The zone as an operator sees it while its program holds device memory.
            host-proxy status --config /etc/host-proxy.toml 2>&1 | sed 's/^/[status] /'
            xl destroy "$dom"
            how=destroyed
            break
        fi
        case "$st" in
        "") how=vanished; break ;;
        *c*) how=crashed; break ;;
        *s*) how=shutdown; break ;;
        esac
        relay "$log"
        sleep 0.25
        n=$((n + 1))
    done
    sleep 0.2   # xenconsoled's last read of the ring
    relay "$log" all
    base=/local/domain/$domid/data/vgpu
    gstate=$(xenstore-read "$base/state" 2>/dev/null) || gstate=unset
    gstatus=$(xenstore-read "$base/exit-status" 2>/dev/null) || gstatus=unset
    gerror=$(xenstore-read "$base/error" 2>/dev/null) || gerror=
    mark "scenario=$name domain-$how after=$(since "$t0")"
    [ -n "$gerror" ] && echo "VGPU-LAB scenario=$name guest-error: $(echo "$gerror" | tr '\n' ' ')"
    mark "scenario=$name guest-state=$gstate guest-exit-status=$gstatus expected-exit-status=$want"
    if [ "$how" = timeout ]; then
        xl list
        xenstore-ls -f "/local/domain/$domid" 2>/dev/null | grep -v '/device\|/control\|/console' | head -40
    fi
    xl destroy "$dom" 2>/dev/null
    if [ "$how" = destroyed ]; then
        # host-proxy must notice (@releaseDomain), kill the zone's worker and end the zone.
        cleanup=missing
        n=0
        while [ $n -lt 40 ]; do
            if grep "domid=$domid" /var/log/host-proxy.log | grep -q "killing its worker" &&
                [ "$(grep -c 'zone started' /var/log/host-proxy.log)" = "$(grep -c 'zone ended' /var/log/host-proxy.log)" ]; then
                cleanup=ok
                break
            fi
            sleep 0.25
            n=$((n + 1))
        done
        mark "scenario=$name host-cleanup=$cleanup after=$(since "$t0")"
        [ $cleanup = ok ] || grep -i "zone\|domain" /var/log/host-proxy.log | tail -5 | sed 's/^/[host-proxy] /'
        mark "scenario=$name end"
        [ $cleanup = ok ]
        return
    fi
    mark "scenario=$name end"
    [ "$how" = shutdown ] && [ "$gstate" = exited ] && [ "$gstatus" = "$want" ]
}

failed=0
exec 3</etc/vgpu-lab/scenarios
while read -r name dom cfg tmo want destroy_on shutdown_on restart_on <&3; do
    [ -n "$name" ] || continue
    if ! run_scenario "$name" "$dom" "$cfg" "$tmo" "$want" "$destroy_on" "$shutdown_on" "$restart_on" </dev/null; then
        failed=$((failed + 1))
        [ "$VGPU_LAB_KEEP_GOING" = 1 ] || { mark "stopping-after-failure scenario=$name"; break; }
    fi
done
exec 3<&-

# The Xen benchmark's counterpart: the same program in dom0 over the local transport.
if grep -q '^bench ' /etc/vgpu-lab/scenarios && [ -x /usr/bin/cudarc_app ]; then
    mark "local-bench begin"
    LD_LIBRARY_PATH=/usr/lib/vgpu VGPU_TRANSPORT=shm VGPU_SOCKET=$HOST_PROXY_SOCKET VGPU_WINDOW_MB=32 \
        cudarc_app bench 1000 2>&1 | sed 's/^/[dom0-local] /'
    mark "local-bench end"
fi

sleep 0.5
# What an operator sees: `host-proxy status` and one scrape of the metrics (histogram
# buckets left out to keep the console short), then the figures the host side checks.
# Every guest is gone by now; give the daemon (bounded) time to reap the last sessions.
n=0
while [ $n -lt 20 ] && ! host-proxy status --config /etc/host-proxy.toml 2>&1 | grep -q '^no zones'; do
    sleep 0.25
    n=$((n + 1))
done
host-proxy status --config /etc/host-proxy.toml 2>&1 | sed 's/^/[status] /'
# (busybox 1.35's static wget crashes with -T: the time limit is timeout's.)
if timeout 10 wget -q -O /tmp/metrics "http://$METRICS/metrics"; then
    grep '^vgpu_' /tmp/metrics | grep -v '_bucket{' | sed 's/^/[metrics] /'
    series() { awk -v s="$1" '$1 == s { v = $2 } END { print v + 0 }' /tmp/metrics; }
    mark "metrics scraped=ok sessions-started=$(series vgpu_sessions_started_total) sessions-ended=$(series vgpu_sessions_ended_total) xen-slots-claimed=$(series vgpu_xen_slots_claimed_total)"
else
    mark "metrics scraped=failed"
fi
mark "zones started=$(grep -c 'zone started' /var/log/host-proxy.log) ended=$(grep -c 'zone ended' /var/log/host-proxy.log)"
HP_STATE=$(host_proxy_state)
mark "host-proxy-end=$HP_STATE"
[ "$HP_STATE" = alive ] || sed 's/^/[host-proxy] /' /var/log/host-proxy.log
mark "scenarios-failed=$failed"
finish
