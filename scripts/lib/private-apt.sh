# Sourced by scripts that download Debian packages without installing them or touching
# /etc/apt: apt runs with a private configuration, package lists and cache under APT_DIR.
#
#   APT_DIR=<cache>/apt DEBIAN_MIRROR=… DEBIAN_SUITE=…
#   . scripts/lib/private-apt.sh
#   setup_apt
#   apt-get "${APT_OPTS[@]}" update && apt-get "${APT_OPTS[@]}" download PACKAGE

APT_OPTS=()
setup_apt() {
    mkdir -p "$APT_DIR"/{etc/sources.list.d,etc/preferences.d,etc/apt.conf.d,lists/partial,cache/archives/partial,state}
    : > "$APT_DIR/state/status"                  # pretend nothing is installed
    echo "deb $DEBIAN_MIRROR $DEBIAN_SUITE main" > "$APT_DIR/etc/sources.list"
    APT_OPTS=(
        -o "Dir::Etc::SourceList=$APT_DIR/etc/sources.list"
        -o "Dir::Etc::SourceParts=$APT_DIR/etc/sources.list.d"
        -o "Dir::Etc::Preferences=$APT_DIR/etc/preferences"
        -o "Dir::Etc::PreferencesParts=$APT_DIR/etc/preferences.d"
        -o "Dir::State=$APT_DIR/state"
        -o "Dir::State::Lists=$APT_DIR/lists"
        -o "Dir::State::status=$APT_DIR/state/status"
        -o "Dir::Cache=$APT_DIR/cache"
        -o "APT::Architecture=amd64"
        -o "APT::Architectures::=amd64"
        -o "Debug::NoLocking=1"
        -o "APT::Sandbox::User=root"
    )
}
