# shellcheck shell=bash
# Shared by devices/raspberry-pi/install.sh and devices/jetson/install.sh (sourced, not run).
# Expects PREFIX, ETC, VAR and SRC to be set. FLORA_USER (default flora) names the service user and
# FLORA_UNIT_DIR (default /etc/systemd/system) where the unit goes. tests/test_devices.py runs these
# functions against a temporary prefix.

SERVICE_USER=${FLORA_USER:-flora}
UNIT_DIR=${FLORA_UNIT_DIR:-/etc/systemd/system}

# check_paths: PREFIX, ETC and VAR must be absolute and plain (they go into sed and the systemd unit,
# where '%' is a specifier and whitespace splits ExecStart).
check_paths() {
    local p
    for p in "$PREFIX" "$ETC" "$VAR"; do
        case "$p" in
            /*) ;;
            *) echo "install.sh: $p is not an absolute path" >&2; return 2 ;;
        esac
        case "$p" in
            *[!A-Za-z0-9._/-]*) echo "install.sh: $p: use only letters, digits and . _ - / in install paths" >&2
                return 2 ;;
        esac
    done
}

# render_unit TEMPLATE: the systemd unit with this install's paths and user, on stdout. MEMORY_MAX (default
# 80%: of the RAM) is its MemoryMax; self_test sets it from the doctor's measurement.
render_unit() {
    local state=""
    case "$VAR" in
        /var/lib/?*) state=${VAR#/var/lib/} ;; # StateDirectory= is relative to /var/lib
    esac
    sed -e "s#@PREFIX@#$PREFIX#g" -e "s#@ETC@#$ETC#g" -e "s#@VAR@#$VAR#g" -e "s#@USER@#$SERVICE_USER#g" \
        -e "s#@MEMORY_MAX@#${MEMORY_MAX:-80%}#g" "$1" |
        if [ -n "$state" ]; then sed "s#@STATE_DIRECTORY@#$state#"; else sed '/@STATE_DIRECTORY@/d'; fi
}

# install_unit: render the agent's unit into UNIT_DIR (atomically) and reload systemd.
install_unit() {
    render_unit "$SRC/devices/systemd/flora-agent.service.in" >"$UNIT_DIR/flora-agent.service.tmp"
    chmod 644 "$UNIT_DIR/flora-agent.service.tmp"
    mv "$UNIT_DIR/flora-agent.service.tmp" "$UNIT_DIR/flora-agent.service"
    systemctl daemon-reload 2>/dev/null || true
}

# memory_max_from FILE: the unit's MemoryMax from `flora-agent doctor` output in FILE: twice the agent peak it
# measured ("agent peak N MiB"), at least 512M; nothing when it measured none.
memory_max_from() {
    local peak
    peak=$(sed -n 's/.*agent peak \([0-9][0-9]*\) MiB.*/\1/p' "$1" | head -n 1)
    [ -n "$peak" ] || return 0
    peak=$((peak * 2))
    [ "$peak" -ge 512 ] || peak=512
    echo "${peak}M"
}

# render_config EXAMPLE: the example agent config with this install's folders, on stdout.
render_config() {
    sed -e "s#/var/lib/flora#$VAR#g" -e "s#/etc/flora#$ETC#g" "$1"
}

# install_service EXAMPLE_CONFIG: the service user, VAR, ETC (config kept if present), the systemd unit.
install_service() {
    echo "== user, folders, config, systemd unit"
    check_paths
    id "$SERVICE_USER" >/dev/null 2>&1 ||
        useradd --system --home-dir "$VAR" --shell /usr/sbin/nologin "$SERVICE_USER"
    install -d -m 750 "$VAR" "$VAR/bundles" "$VAR/images" "$VAR/state"
    chown "$SERVICE_USER:$SERVICE_USER" "$VAR" "$VAR/bundles" "$VAR/images" "$VAR/state"
    install -d -m 755 "$ETC"
    if [ ! -f "$ETC/agent.toml" ]; then
        render_config "$1" >"$ETC/agent.toml.tmp"
        chmod 644 "$ETC/agent.toml.tmp"
        mv "$ETC/agent.toml.tmp" "$ETC/agent.toml"
    fi
    if [ ! -f "$ETC/agent.env" ]; then
        install -m 600 /dev/null "$ETC/agent.env"
        echo "# FLORA_MQTT_PASSWORD=" >"$ETC/agent.env"
    fi
    install -d -m 755 "$UNIT_DIR"
    install_unit
}

# install_bundle DIR: copy a bundle into VAR/bundles; prints its installed path. The copy goes to a
# temporary folder next to the old one and replaces it by rename only once complete, so a failed
# copy leaves the installed bundle as it was. Given the installed bundle itself, it copies nothing.
install_bundle() {
    local src dest name tmp
    src=$(cd "$1" 2>/dev/null && pwd -P) || { echo "install.sh: no such bundle folder: $1" >&2; return 2; }
    [ -f "$src/manifest.json" ] || { echo "install.sh: $1 is not a bundle (no manifest.json)" >&2; return 2; }
    name=$(basename "$src")
    dest="$(cd "$VAR/bundles" && pwd -P)/$name"
    if [ "$src" = "$dest" ]; then
        echo "install.sh: $1 is the installed bundle $dest: not copying it onto itself" >&2
        echo "$dest"
        return 0
    fi
    case "$dest/" in
        "$src"/*) echo "install.sh: $dest lies inside $src: refusing to copy a folder into itself" >&2; return 2 ;;
    esac
    case "$src/" in
        "$dest"/*) echo "install.sh: $src lies inside the installed $dest: copy it elsewhere first" >&2; return 2 ;;
    esac
    tmp=$(mktemp -d "$VAR/bundles/.$name.XXXXXX")
    if ! cp -R "$src/." "$tmp/"; then
        rm -rf "$tmp"
        echo "install.sh: copying $src failed; $dest is unchanged" >&2
        return 1
    fi
    chmod 750 "$tmp"
    chown -R "$SERVICE_USER:$SERVICE_USER" "$tmp"
    if [ -e "$dest" ]; then mv "$dest" "$tmp.old"; fi
    mv "$tmp" "$dest"
    rm -rf "$tmp.old"
    echo "$dest"
}

# as_service_user CMD...: run CMD as the service user in VAR, with agent.env's variables (as systemd would).
as_service_user() {
    (
        cd "$VAR" || exit 1
        set -a
        # shellcheck disable=SC1091  # written by install_service
        if [ -r "$ETC/agent.env" ]; then . "$ETC/agent.env"; fi
        set +a
        if command -v runuser >/dev/null; then exec runuser -u "$SERVICE_USER" -- "$@"; fi
        exec sudo -E -u "$SERVICE_USER" -- "$@"
    )
}

# runtime_check: onnxruntime imports in the venv, for the service user; prints its version and providers.
runtime_check() {
    echo "== onnxruntime in $PREFIX/venv, as $SERVICE_USER"
    as_service_user "$PREFIX/venv/bin/python" -c \
        "import onnxruntime as o; print('onnxruntime', o.__version__, 'providers', o.get_available_providers())"
}

# self_test BUNDLE [DOCTOR OPTIONS...]: `flora-agent doctor` on the bundle, as the service user; the unit's
# MemoryMax is then set from the peak it measured. Returns the doctor's status.
self_test() {
    local bundle=$1 out rc measured
    shift
    echo "== self-test of $bundle, as $SERVICE_USER"
    out=$(mktemp)
    rc=0
    as_service_user "$PREFIX/venv/bin/flora-agent" doctor --bundle "$bundle" "$@" | tee "$out" || rc=${PIPESTATUS[0]}
    measured=$(memory_max_from "$out")
    rm -f "$out"
    if [ -n "$measured" ]; then
        MEMORY_MAX=$measured
        echo "== MemoryMax=$MEMORY_MAX in $UNIT_DIR/flora-agent.service (twice the measured peak)"
        install_unit
    fi
    return "$rc"
}

next_steps() {
    cat <<MSG
== done. Next:
   edit $ETC/agent.toml (bundle, data, client_id, broker), put FLORA_MQTT_PASSWORD in $ETC/agent.env,
   copy the broker's CA to $ETC/ca.crt and your images to $VAR/images/<class>/, then check as the service
   user, with the password from agent.env:
   sudo sh -c 'set -a; . $ETC/agent.env; exec runuser -u $SERVICE_USER -- $PREFIX/venv/bin/flora-agent doctor --config $ETC/agent.toml'
   systemctl enable --now flora-agent && journalctl -u flora-agent -f
MSG
}
