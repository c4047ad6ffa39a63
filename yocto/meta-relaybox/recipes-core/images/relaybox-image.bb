# nooelint: oelint.var.suggestedvar.BUGTRACKER,oelint.var.suggestedvar.CVE_PRODUCT - an image recipe: no bug tracker yet, no CVE product of its own
SUMMARY = "A Raspberry Pi image whose job is relaybox"
DESCRIPTION = "A small systemd image for raspberrypi4-64 and raspberrypi3-64 that starts \
               relaybox at boot: MQTT on port 1883, the store in /var/lib/relaybox, the \
               config in /etc/relaybox/relaybox.toml."
SECTION = "images"
LICENSE = "MIT"

inherit core-image features_check

REQUIRED_DISTRO_FEATURES = "systemd"
COMPATIBLE_MACHINE = "^(raspberrypi4-64|raspberrypi3-64)$"

IMAGE_INSTALL:append = " relaybox"
IMAGE_FEATURES:append = " ssh-server-dropbear"
