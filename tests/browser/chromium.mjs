// Debian's Chromium, headless, as the browser tests start it: no sandbox (root in CI), and no
// background traffic to anywhere (the machines have no internet, and a test must not try).
import { chromium } from 'playwright-core';

export function launch(extraArgs = []) {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--disable-dev-shm-usage',
      ...extraArgs,
    ],
  });
}
