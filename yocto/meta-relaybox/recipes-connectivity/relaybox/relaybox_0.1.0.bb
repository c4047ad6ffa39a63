# nooelint: oelint.var.mandatoryvar.HOMEPAGE,oelint.var.suggestedvar.BUGTRACKER,oelint.var.bbclassextend - no public site or bug tracker yet; a target service (no native use)
SUMMARY = "Office relay: local MQTT broker with a durable outbox bridged to a NATS hub"
DESCRIPTION = "relaybox serves MQTT 3.1.1 and 5 to the devices of an office, keeps on flash \
               every message it must send upstream and forwards it to a NATS hub with \
               JetStream, deleting each one only after the hub acknowledged it. It runs as a \
               hardened Type=notify systemd service with a watchdog."
SECTION = "net"
# relaybox itself; the crates it links statically carry their own permissive licenses
# (MIT, Apache-2.0, ISC, BSD-3-Clause, Unicode-3.0 and the like: see Cargo.lock).
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"
CVE_PRODUCT = "relaybox"

# The source is the relaybox tree this layer lives in (RELAYBOX_SRCDIR, conf/layer.conf), so
# an image holds the checked-out commit. The crates come from relaybox-crates.inc, pinned to
# Cargo.lock, and cargo builds offline from them.
EXTERNALSRC ?= "${RELAYBOX_SRCDIR}"
inherit cargo_bin externalsrc systemd useradd

require relaybox-crates.inc
SRC_URI += "file://cargo-vendored-crates.toml"

# meta-rust-bin's cargo_bin flags: no network, exactly Cargo.lock, only the relaybox binary.
# nooelint: oelint.vars.mispell - EXTRA_CARGO_FLAGS belongs to meta-rust-bin's cargo_bin class
EXTRA_CARGO_FLAGS = "--frozen --bin relaybox"

do_configure:append() {
    sed -e "s|@CARGO_HOME@|${CARGO_HOME}|" ${WORKDIR}/cargo-vendored-crates.toml >>${CARGO_HOME}/config
}

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --user-group --home-dir ${localstatedir}/lib/relaybox --no-create-home --shell ${base_sbindir}/nologin relaybox"

SYSTEMD_SERVICE:${PN} = "relaybox.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/packaging/relaybox.service ${D}${systemd_system_unitdir}/relaybox.service
    install -d ${D}${sysconfdir}/relaybox
    install -m 0640 ${S}/packaging/relaybox.toml ${D}${sysconfdir}/relaybox/relaybox.toml
    chgrp relaybox ${D}${sysconfdir}/relaybox/relaybox.toml
    install -d -m 0750 ${D}${localstatedir}/lib/relaybox
    chown relaybox:relaybox ${D}${localstatedir}/lib/relaybox
    # The unit's Documentation= (in ${PN}-doc, like every man page).
    install -d ${D}${mandir}/man1 ${D}${docdir}/relaybox
    install -m 0644 ${S}/packaging/relaybox.1 ${D}${mandir}/man1/relaybox.1
    install -m 0644 ${S}/README.md ${D}${docdir}/relaybox/README.md
}

FILES:${PN} += "${localstatedir}/lib/relaybox"
CONFFILES:${PN} = "${sysconfdir}/relaybox/relaybox.toml"

# Serial devices belong to dialout (base-passwd); the unit adds it as a supplementary group.
RDEPENDS:${PN} = "base-passwd"
