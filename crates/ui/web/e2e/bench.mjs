// The browser half of the UI benchmark (crates/ui/examples/ui_bench.rs):
// opens the page in headless Chromium, lets it run under load for
// $SECONDS, and prints one JSON line of Chromium's performance metrics
// (main-thread busy time, script time, JS heap, DOM nodes) and how long
// a click takes to show.
import { chromium } from "playwright-core";

const { UI_URL, SECONDS } = process.env;
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  await page.goto(UI_URL);
  const cdp = await page.context().newCDPSession(page);
  await cdp.send("Performance.enable");
  const metrics = async () => {
    const { metrics } = await cdp.send("Performance.getMetrics");
    return Object.fromEntries(metrics.map((m) => [m.name, m.value]));
  };
  await page.locator("[data-testid=edge]").first().waitFor({ timeout: 30000 });
  await page.waitForTimeout(5000);
  const m0 = await metrics();
  const t0 = Date.now();
  const minutes = [];
  const total = Number(SECONDS ?? 600) * 1000;
  let last = m0;
  while (Date.now() - t0 < total) {
    await page.waitForTimeout(Math.min(60000, total - (Date.now() - t0)));
    const m = await metrics();
    minutes.push({
      busy: (m.TaskDuration - last.TaskDuration) / ((m.Timestamp - last.Timestamp) || 1),
      heap_mb: m.JSHeapUsedSize / 1048576,
    });
    last = m;
  }
  const m1 = await metrics();
  // Responsiveness: a click on Pause until the button says Resume.
  const clicks = [];
  for (let i = 0; i < 10; i++) {
    const t = performance.now();
    await page.getByTestId("pause").click();
    await page.getByText(i % 2 ? "Pause" : "Resume", { exact: true }).waitFor();
    clicks.push(performance.now() - t);
  }
  clicks.sort((a, b) => a - b);
  const counts = await page.getByTestId("flow-counts").textContent();
  const edges = await page.locator("[data-testid=edge]").count();
  const wall = m1.Timestamp - m0.Timestamp;
  console.log(
    JSON.stringify({
      seconds: wall,
      busy: (m1.TaskDuration - m0.TaskDuration) / wall,
      script: (m1.ScriptDuration - m0.ScriptDuration) / wall,
      layout: (m1.LayoutDuration - m0.LayoutDuration) / wall,
      heap_mb_start: m0.JSHeapUsedSize / 1048576,
      heap_mb_end: m1.JSHeapUsedSize / 1048576,
      heap_total_mb_end: m1.JSHeapTotalSize / 1048576,
      dom_nodes: m1.Nodes,
      click_ms_median: clicks[5],
      click_ms_max: clicks[9],
      seen: Number((counts.match(/(\d+) seen/) ?? [0, 0])[1]),
      edges,
      minutes,
    }),
  );
} finally {
  await browser.close();
}
