// Browser test of the diskless web console in a cluster, in Debian's headless Chromium
// (playwright-core). Run by tests/cluster_api.rs, which starts etcd and the nodes and places a
// client on another node than the one whose console this opens. Prints "STEP shown" when the
// console showed the nodes and the remote client, then waits for the line "paused" on stdin
// (the test has paused the client's node) and prints "STEP done" once the console marks the
// client stale; exits non-zero otherwise.
//
// Environment: CONSOLE_URL, CONSOLE_TOKEN, CLIENT (initiator name), OWNER (node serving it),
// NODES (comma-separated node ids), SHOTS (screenshot dir).
import { env, expectLine, runPage, WAIT } from "./harness.mjs";

const { CONSOLE_URL, CONSOLE_TOKEN, CLIENT, OWNER, NODES, SHOTS } = env("cluster.mjs", ["CONSOLE_URL", "CONSOLE_TOKEN", "CLIENT", "OWNER", "NODES", "SHOTS"]);

await runPage("cluster.mjs", CONSOLE_URL, 900, async (page, pageFailed) => {
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
  if (pageFailed()) throw new Error("the page reported errors");
  console.log("STEP done");
});
