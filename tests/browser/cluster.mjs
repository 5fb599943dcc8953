// Browser test of the diskless web console in a cluster, in Debian's headless Chromium
// (playwright-core). Run by tests/cluster_api.rs, which starts etcd and the nodes and places a
// client on another node than the one whose console this opens. Prints "STEP shown" when the
// console showed the nodes and the remote client, then waits for the line "paused" on stdin
// (the test has paused the client's node) and prints "STEP done" once the console marks the
// client stale; exits non-zero otherwise.
//
// Environment: CONSOLE_URL, CONSOLE_TOKEN, CLIENT (initiator name), OWNER (node serving it),
// NODES (comma-separated node ids), SHOTS (screenshot dir).
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { createInterface } from "node:readline";

const { CONSOLE_URL, CONSOLE_TOKEN, CLIENT, OWNER, NODES, SHOTS } = process.env;
if (!CONSOLE_URL || !CONSOLE_TOKEN || !CLIENT || !OWNER || !NODES || !SHOTS) {
  console.error("cluster.mjs: CONSOLE_URL, CONSOLE_TOKEN, CLIENT, OWNER, NODES and SHOTS must be set");
  process.exit(2);
}
mkdirSync(SHOTS, { recursive: true });
const WAIT = 20000;
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function expectLine(want) {
  const { value, done } = await lines.next();
  if (done || value.trim() !== want) throw new Error(`expected "${want}" from the test, got ${done ? "EOF" : JSON.stringify(value)}`);
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1366, height: 900 } });
  page.on("pageerror", (e) => { console.error("page error: " + e.message); failed = true; });
  page.on("console", (m) => { if (m.type() === "error") console.error("console error: " + m.text()); });
  await page.goto(CONSOLE_URL);
  await page.locator("#login-token").waitFor({ state: "visible", timeout: WAIT });
  await page.fill("#login-token", CONSOLE_TOKEN);
  await page.click("#login-ok");

  // The nodes table lists every node, each answering.
  const nodes = page.locator("#nodes");
  for (const id of NODES.split(",")) {
    await nodes.locator("tbody tr", { hasText: id }).first().waitFor({ timeout: WAIT });
  }
  const rows = await nodes.locator("tbody tr").count();
  if (rows !== NODES.split(",").length) throw new Error(`nodes table has ${rows} rows, want ${NODES}`);
  // The card of the client another node serves, marked with that node.
  const card = page.locator(`.card[data-initiator="${CLIENT}"][data-node="${OWNER}"]`);
  await card.locator(".node", { hasText: "on " + OWNER }).waitFor({ timeout: WAIT });
  await card.locator(".state", { hasText: "running" }).waitFor({ timeout: WAIT });
  await page.screenshot({ path: `${SHOTS}/01-nodes-and-remote-client.png`, fullPage: true });

  // Its page, from the owner's API.
  await card.click();
  await page.locator("#client-node", { hasText: OWNER }).waitFor({ timeout: WAIT });
  await page.locator("#client-sessions", { hasText: "1" }).waitFor({ timeout: WAIT });
  await page.screenshot({ path: `${SHOTS}/02-remote-client-page.png`, fullPage: true });
  console.log("STEP shown");

  // The owner paused: back on the clients page, the card is marked stale (from etcd).
  await expectLine("paused");
  await page.goto(CONSOLE_URL + "#/clients");
  await page.reload();
  const stale = page.locator(`.card.stale[data-initiator="${CLIENT}"]`);
  await stale.locator(".stale-mark", { hasText: "stale" }).waitFor({ timeout: WAIT });
  const why = await stale.getAttribute("title");
  if (!why || !why.includes(OWNER)) throw new Error(`stale card's reason does not name ${OWNER}: ${why}`);
  await page.screenshot({ path: `${SHOTS}/03-owner-paused-stale.png`, fullPage: true });
  if (failed) throw new Error("the page reported errors");
  console.log("STEP done");
} catch (e) {
  console.error(e.stack || String(e));
  failed = true;
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
