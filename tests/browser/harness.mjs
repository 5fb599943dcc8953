// What the browser tests (console.mjs, cluster.mjs) share: their environment, the line
// protocol with the Rust test that runs them (it writes a line on stdin before each next
// stage), and one console page in Debian's headless Chromium (playwright-core).
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { mkdirSync } from "node:fs";

/** How long any one thing on the page may take to appear (ms). */
export const WAIT = 20000;

/** The environment variables `names`, or exit 2 naming them; the SHOTS directory is made. */
export function env(script, names) {
  const missing = names.filter((n) => !process.env[n]);
  if (missing.length) {
    console.error(`${script}: ${names.join(", ")} must be set (missing: ${missing.join(", ")})`);
    process.exit(2);
  }
  if (process.env.SHOTS) mkdirSync(process.env.SHOTS, { recursive: true });
  return Object.fromEntries(names.map((n) => [n, process.env[n]]));
}

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
/** Wait for the test's next line on stdin, which must be `want`. */
export async function expectLine(want) {
  const { value, done } = await lines.next();
  if (done || value.trim() !== want) throw new Error(`expected "${want}" from the test, got ${done ? "EOF" : JSON.stringify(value)}`);
}

/**
 * Open `url` in a page `height` pixels high and run `body(page, pageFailed)`; exits 0 only if
 * it returned and the page reported no error (`pageFailed()` says whether it has so far).
 */
export async function runPage(script, url, height, body) {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  let failed = false;
  try {
    const page = await browser.newPage({ viewport: { width: 1366, height } });
    page.on("pageerror", (e) => { console.error("page error: " + e.message); failed = true; });
    page.on("console", (m) => { if (m.type() === "error") console.error("console error: " + m.text()); });
    await page.goto(url);
    await body(page, () => failed);
  } catch (e) {
    console.error(`${script}: ` + (e && e.stack ? e.stack : e));
    failed = true;
  } finally {
    await browser.close();
  }
  process.exit(failed ? 1 : 0);
}
