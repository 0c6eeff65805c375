# shellcheck shell=bash
# Shared by devices/raspberry-pi/install.sh and devices/jetson/install.sh (sourced, not run).
# Expects PREFIX, ETC, VAR and SRC to be set.

# install_service EXAMPLE_CONFIG: the `flora` user, /var/lib/flora, /etc/flora, the systemd unit.
install_service() {
    echo "== user, folders, config, systemd unit"
    id flora >/dev/null 2>&1 || useradd --system --home-dir "$VAR" --shell /usr/sbin/nologin flora
    install -d -o flora -g flora -m 750 "$VAR" "$VAR/bundles" "$VAR/images" "$VAR/state"
    install -d -m 755 "$ETC"
    [ -f "$ETC/agent.toml" ] || install -m 644 "$1" "$ETC/agent.toml"
    if [ ! -f "$ETC/agent.env" ]; then
        install -m 600 /dev/null "$ETC/agent.env"
        echo "# FLORA_MQTT_PASSWORD=" > "$ETC/agent.env"
    fi
    install -m 644 "$SRC/devices/systemd/flora-agent.service" /etc/systemd/system/flora-agent.service
    systemctl daemon-reload 2>/dev/null || true
}

# install_bundle DIR: copy a bundle into /var/lib/flora/bundles; prints its new path.
install_bundle() {
    local name
    name=$(basename "$1")
    rm -rf "${VAR:?}/bundles/$name"
    cp -r "$1" "$VAR/bundles/$name"
    chown -R flora:flora "$VAR/bundles/$name"
    echo "$VAR/bundles/$name"
}

next_steps() {
    cat <<MSG
== done. Next:
   edit $ETC/agent.toml (bundle, data, client_id, broker), put FLORA_MQTT_PASSWORD in $ETC/agent.env,
   copy the broker's CA to $ETC/ca.crt and your images to $VAR/images/<class>/, then
   $PREFIX/venv/bin/flora-agent doctor --config $ETC/agent.toml
   systemctl enable --now flora-agent && journalctl -u flora-agent -f
MSG
}
