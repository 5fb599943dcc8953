// Browser test of the diskless web console in Debian's headless Chromium (playwright-core).
// Run by tests/console.rs, which starts the server, drives real iSCSI logins and checks the
// result on the server. Protocol: this script prints "STEP <name>" lines on stdout when it
// has seen something, and waits for a line on stdin before each next stage.
//
// Environment: CONSOLE_URL, CONSOLE_TOKEN, CLIENT (initiator name), SHOTS (screenshot dir).
import { env, expectLine, runPage, WAIT } from "./harness.mjs";

const { CONSOLE_URL, CONSOLE_TOKEN, CLIENT, SHOTS } = env("console.mjs", ["CONSOLE_URL", "CONSOLE_TOKEN", "CLIENT", "SHOTS"]);
const step = (name) => console.log("STEP " + name);
let shot = 0;
async function snap(page, name) {
  shot += 1;
  await page.screenshot({ path: `${SHOTS}/${String(shot).padStart(2, "0")}-${name}.png`, fullPage: true });
}

await runPage("console.mjs", CONSOLE_URL, 800, async (page) => {
  // The server has a token: the console asks for it.
  await page.locator("#login-token").waitFor({ state: "visible", timeout: WAIT });
  await snap(page, "token-prompt");
  await page.fill("#login-token", CONSOLE_TOKEN);
  await page.click("#login-ok");
  const card = page.locator(`.card[data-initiator="${CLIENT}"]`);
  await card.locator(".state", { hasText: "offline" }).waitFor({ timeout: WAIT });
  await page.locator("#live.on").waitFor({ timeout: WAIT });
  await snap(page, "matrix-offline");
  step("ready");

  // The client's firmware logs in: the matrix shows it live (event stream, no reload).
  await expectLine("firmware");
  await page.locator(`.card.firmware[data-initiator="${CLIENT}"]`).waitFor({ timeout: WAIT });
  await snap(page, "matrix-firmware");
  step("saw-firmware");

  // Its OS takes over and writes.
  await expectLine("os");
  await page.locator(`.card.running[data-initiator="${CLIENT}"]`).waitFor({ timeout: WAIT });
  await snap(page, "matrix-running");
  step("saw-running");

  // The client page: details, timeline with the boot and the hand-off.
  await page.locator(`.card[data-initiator="${CLIENT}"]`).click();
  await page.locator("#client-state", { hasText: "running" }).waitFor({ timeout: WAIT });
  await page.locator("#timeline li.boot").first().waitFor({ timeout: WAIT });
  await page.locator("#timeline li.handoff").first().waitFor({ timeout: WAIT });
  await snap(page, "client-page");

  // Reset, through the confirmation. Cancel first: nothing happens.
  await page.click("#action-reset");
  await page.locator("#confirm[open]").waitFor({ timeout: WAIT });
  await snap(page, "reset-confirmation");
  await page.click("#confirm-cancel");
  await page.locator("#confirm[open]").waitFor({ state: "detached", timeout: WAIT }).catch(() => {});
  if (await page.locator("#confirm[open]").count()) throw new Error("the confirmation did not close on Cancel");
  await page.locator("#client-state", { hasText: "running" }).waitFor({ timeout: WAIT });
  step("cancelled");
  await expectLine("still-running");

  await page.click("#action-reset");
  await page.locator("#confirm[open]").waitFor({ timeout: WAIT });
  await page.click("#confirm-ok");
  await page.locator("#toast", { hasText: "reset " + CLIENT }).waitFor({ timeout: WAIT });
  await page.locator("#client-state", { hasText: "offline" }).waitFor({ timeout: WAIT });
  await snap(page, "after-reset");
  step("reset");

  await expectLine("checked");

  // Next boot: the form (image + mode), confirmed; the client page shows the override.
  await page.click("#action-next-boot");
  await page.locator("#nextboot[open]").waitFor({ timeout: WAIT });
  await page.fill("#nextboot-image", "golden");
  await page.selectOption("#nextboot-mode", "persistent");
  await snap(page, "next-boot-form");
  await page.click("#nextboot-ok");
  await page.locator("#toast", { hasText: "next boot set" }).waitFor({ timeout: WAIT });
  await page.locator("#client-next-boot", { hasText: "persistent" }).waitFor({ timeout: WAIT });
  await snap(page, "next-boot-set");
  step("next-boot");
  await expectLine("next-boot-checked");

  await page.click('nav a[data-page="events"]');
  await page.locator("main[data-page=events] table").waitFor({ timeout: WAIT });
  await snap(page, "events");
  await page.click('nav a[data-page="audit"]');
  await page.locator("main[data-page=audit] td", { hasText: "reset client " + CLIENT }).first().waitFor({ timeout: WAIT });
  await snap(page, "audit");
  step("done");
});
