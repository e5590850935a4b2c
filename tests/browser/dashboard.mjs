// Drives Debian's chromium (playwright-core, no browser download) against a running cloud's
// dashboard. Run by tests/tests/dashboard.rs, which starts the broker, the cloud and the edges and
// passes, in the environment:
//   BACKHAUL_URL        the cloud's base URL
//   FLEET_KEY           a fleet key; DEVICE_KEY: the key of device DEVICE
//   EXPECT              "device=detections,..." the counts the fleet table must reach
//   REPLAY_DEVICE       the device to send a replay to, REPLAY_SINCE its `since` (RFC 3339, UTC)
//   SCREENSHOT          where to save a screenshot of the page
//   CHROMIUM            the browser (default /usr/bin/chromium)
// It prints one line per step; "ready" once signed in (the test starts the edges then), "ok" at
// the end. Any failed check throws: the process exits non-zero with the reason.
import { chromium } from "playwright-core";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const url = env("BACKHAUL_URL");
const expect = Object.fromEntries(env("EXPECT").split(",").map((p) => p.split("=")).map(([d, n]) => [d, Number(n)]));
const deadline = (s) => ({ timeout: s * 1000, polling: 200 });
const step = (s) => console.log(s);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
try {
  const fleet = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
  const page = await fleet.newPage();
  const requests = [];
  page.on("request", (r) => requests.push(r.url()));
  const failOn = (p) => {
    p.on("pageerror", (e) => { console.log("page error: " + e.message); process.exitCode = 1; });
    // A blocked inline script or style (the CSP names them by hash) would show here.
    p.on("console", (m) => {
      if (m.type() === "error" && /Content Security Policy/i.test(m.text())) {
        console.log("CSP violation: " + m.text());
        process.exitCode = 1;
      }
    });
  };
  failOn(page);
  await page.goto(url + "/");

  // A wrong key is refused and says so.
  await page.fill("#key", "not-a-key");
  await page.click("#signin button");
  await page.waitForFunction(() => document.getElementById("signin-error").textContent.includes("refused"), null, deadline(10));
  step("a wrong key is refused");

  await page.fill("#key", env("FLEET_KEY"));
  await page.click("#signin button");
  await page.waitForSelector("#app:not([hidden])", { timeout: 10000 });
  await page.waitForFunction(() => document.getElementById("who").textContent === "fleet key", null, deadline(10));
  await page.waitForFunction(() => document.getElementById("feed-state").textContent === "live", null, deadline(10));

  // A device key's page, open while the edges send: its feed must carry its own device only.
  const own = await browser.newContext();
  const devicePage = await own.newPage();
  failOn(devicePage);
  await devicePage.goto(url + "/");
  await devicePage.fill("#key", env("DEVICE_KEY"));
  await devicePage.click("#signin button");
  await devicePage.waitForSelector("#app:not([hidden])", { timeout: 10000 });
  await devicePage.waitForFunction(() => document.getElementById("feed-state").textContent === "live", null, deadline(10));
  step("ready");

  // Both devices, with the right counts.
  const counts = async () => page.$$eval("#fleet tbody tr", (rows) => Object.fromEntries(rows.map((r) =>
    [r.dataset.device, Number(r.querySelector('[data-col="detections"]').textContent)])));
  await page.waitForFunction((want) => {
    const rows = [...document.querySelectorAll("#fleet tbody tr")];
    const have = Object.fromEntries(rows.map((r) => [r.dataset.device, Number(r.querySelector('[data-col="detections"]').textContent)]));
    return Object.keys(want).length === rows.length && Object.entries(want).every(([d, n]) => have[d] === n);
  }, expect, deadline(90)).catch(async (e) => { throw new Error(`fleet table never showed ${JSON.stringify(expect)}: it shows ${JSON.stringify(await counts())} (${e.message})`); });
  step("fleet table: " + JSON.stringify(await counts()));
  for (const d of Object.keys(expect)) {
    const online = await page.textContent(`#fleet tbody tr[data-device="${d}"] [data-col="online"]`);
    if (online !== "yes") throw new Error(`${d} shows online=${online}`);
    const link = await page.textContent(`#fleet tbody tr[data-device="${d}"] [data-col="link"]`);
    if (link !== "mqtt") throw new Error(`${d} shows link=${link}`);
  }
  // Ledgers come with the statuses (every status_interval): balanced once drained.
  await page.waitForFunction((ds) => ds.every((d) =>
    document.querySelector(`#fleet tbody tr[data-device="${d}"] [data-col="ledger"]`).textContent === "balanced"),
    Object.keys(expect), deadline(60));
  step("ledgers balanced");

  // The live feed moved while the edges sent, and the rate chart saw it.
  const fed = Number(await page.textContent("#feed-count"));
  const total = Object.values(expect).reduce((a, b) => a + b, 0);
  if (fed < 2) throw new Error(`the live feed showed ${fed} batches`);
  const lines = await page.$$eval("#feed li", (li) => li.map((l) => l.dataset.device));
  for (const d of Object.keys(expect)) if (!lines.includes(d)) throw new Error(`no feed line for ${d}: ${lines}`);
  step(`live feed: ${fed} batches (${total} detections stored)`);
  const rate = await page.evaluate(async (key) => {
    const r = await fetch("/api/v1/ingest-rate?seconds=600", { headers: { "X-API-Key": key } });
    return (await r.json()).points.reduce((a, p) => a + p.new, 0);
  }, env("FLEET_KEY"));
  if (rate !== total) throw new Error(`the ingest rate counted ${rate} new detections, not ${total}`);
  step("ingest rate: " + rate + " new detections in the window");

  // Sorting: by detections, largest first after two clicks.
  await page.click('#fleet th[data-sort="detections"]');
  await page.click('#fleet th[data-sort="detections"]');
  const order = await page.$$eval("#fleet tbody tr", (rows) => rows.map((r) => r.dataset.device));
  const want = Object.entries(expect).sort((a, b) => b[1] - a[1]).map(([d]) => d);
  if (JSON.stringify(order) !== JSON.stringify(want)) throw new Error(`sorted ${order}, want ${want}`);
  step("sorted by detections: " + order.join(", "));

  // A replay since T from the device's page, and its result.
  const device = env("REPLAY_DEVICE");
  await page.click(`#fleet tbody tr[data-device="${device}"]`);
  await page.waitForSelector("#device:not([hidden])");
  await page.waitForFunction(() => document.getElementById("gaps-summary").textContent !== "", null, deadline(10));
  const since = new Date(env("REPLAY_SINCE"));
  const local = new Date(since.getTime() - since.getTimezoneOffset() * 60000).toISOString().slice(0, 19);
  await page.fill("#replay-since", local);
  // Shown plus dropped: a burst over a stream's 25 events per flush is partly dropped, counted.
  const fedAndDropped = () => Number(document.getElementById("feed-count").textContent)
    + parseInt(document.getElementById("feed-dropped").textContent, 10);
  const fedBefore = await page.evaluate(fedAndDropped);
  await page.click("#replay-send");
  await page.waitForFunction(() => document.getElementById("replay-result").textContent.startsWith("Sent: "), null, deadline(10));
  const id = (await page.textContent("#replay-result")).slice("Sent: ".length);
  await page.waitForFunction((id) => {
    const s = document.querySelector(`#commands tr[data-command="${id}"] [data-col="status"]`);
    return s && s.textContent === "done";
  }, id, deadline(90));
  const result = JSON.parse(await page.textContent(`#commands tr[data-command="${id}"] [data-col="result"]`));
  if (!(result.requeued_batches > 0)) throw new Error(`replay result ${JSON.stringify(result)}`);
  step(`replay ${id}: done, ${result.requeued_batches} batches requeued`);
  // They come back as duplicates, in the feed.
  await page.waitForFunction((n) => Number(document.getElementById("feed-count").textContent)
    + parseInt(document.getElementById("feed-dropped").textContent, 10) >= n, fedBefore + result.requeued_batches, deadline(60));
  await page.waitForFunction(() => [...document.querySelectorAll("#feed li")].some((l) => l.textContent.includes("duplicate")), null, deadline(10));
  step("the replayed batches came back as duplicates in the live feed");
  await page.waitForTimeout(2500); // one refresh of the charts, for the picture only
  await page.screenshot({ path: env("SCREENSHOT"), fullPage: true });
  step("screenshot: " + env("SCREENSHOT"));

  // The key never travels in a URL.
  const leaked = requests.filter((r) => r.includes(env("FLEET_KEY")));
  if (leaked.length) throw new Error("the key appeared in a URL: " + leaked[0]);

  // The device key's page: one device, no replay button, its own feed only.
  await devicePage.waitForFunction(() => document.querySelectorAll("#fleet tbody tr").length > 0, null, deadline(10));
  const ownFeed = await devicePage.$$eval("#feed li", (li) => li.map((l) => l.dataset.device));
  if (ownFeed.length === 0 || ownFeed.some((d) => d !== env("DEVICE"))) {
    throw new Error(`a device key's live feed showed ${JSON.stringify(ownFeed)}`);
  }
  step(`a device key's live feed: ${ownFeed.length} lines, all of ${env("DEVICE")}`);
  const seen = await devicePage.$$eval("#fleet tbody tr", (rows) => rows.map((r) => r.dataset.device));
  if (JSON.stringify(seen) !== JSON.stringify([env("DEVICE")])) throw new Error(`a device key sees ${seen}`);
  await devicePage.click(`#fleet tbody tr[data-device="${seen[0]}"]`);
  await devicePage.waitForSelector("#device:not([hidden])");
  if (await devicePage.isVisible("#replay")) throw new Error("a device key is offered the replay button");
  const forbidden = await devicePage.evaluate(async ([key, other]) => {
    const r = await fetch(`/api/v1/devices/${other}/batches`, { headers: { "X-API-Key": key } });
    return r.status;
  }, [env("DEVICE_KEY"), Object.keys(expect).find((d) => d !== env("DEVICE"))]);
  if (forbidden !== 403) throw new Error(`a device key read another device's batches: ${forbidden}`);
  step("a device key sees one device: " + seen.join(", "));

  // Signing out forgets the key.
  await devicePage.click("#signout");
  await devicePage.waitForSelector("#signin-form:not([hidden])");
  const kept = await devicePage.evaluate(() => sessionStorage.getItem("backhaul.key"));
  if (kept !== null) throw new Error("the key stayed in sessionStorage after signing out");
  step("ok");
} finally {
  await browser.close();
}
