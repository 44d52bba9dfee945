// The UI end to end in headless Chromium (Debian's, driven by
// playwright-core): run by crates/cli/tests/ui_e2e.rs against the seed's
// two-node lab. Exits non-zero at the first expectation that fails;
// screenshots go to $ARTIFACTS.
//
// Environment: UI_URL, ARTIFACTS, FIBRIL (the CLI), LAB, BACKEND (ip:port).
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";

const { UI_URL, ARTIFACTS, FIBRIL, LAB, BACKEND } = process.env;
for (const [k, v] of Object.entries({ UI_URL, ARTIFACTS, FIBRIL, LAB, BACKEND })) {
  if (!v) throw new Error(`${k} is not set`);
}

function get(pod) {
  try {
    execFileSync(FIBRIL, ["--lab", LAB, "lab", "exec", `microservices/${pod}`, "--", "fibril-echo", "http-get", "--timeout", "1", `http://${BACKEND}/`], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

const edge = (page, from, to) =>
  page.locator(`[data-testid=edge][data-source="microservices/${from}"][data-target="microservices/${to}"]`);

async function shot(page, name) {
  await page.screenshot({ path: `${ARTIFACTS}/${name}.png` });
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
const errors = [];
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 }, acceptDownloads: true });
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(UI_URL);

  // The map: frontend -> backend green, other-client -> backend red with
  // the policy that selects backend.
  await edge(page, "frontend", "backend").and(page.locator("[data-verdict=forwarded]")).waitFor({ timeout: 15000 });
  const red = edge(page, "other-client", "backend");
  await red.and(page.locator("[data-verdict=dropped]")).waitFor({ timeout: 15000 });
  const policy = await red.getAttribute("data-policy");
  if (!policy?.includes("default deny, selected by microservices/allow-frontend-to-backend")) {
    throw new Error(`the red edge's policy: ${policy}`);
  }
  const green = await edge(page, "frontend", "backend").getAttribute("data-policy");
  // The policy and its rule (its first rule's first ingress entry).
  if (!green?.includes("allowed by microservices/allow-frontend-to-backend (CiliumNetworkPolicy) rule 0 ingress[0]")) {
    throw new Error(`the green edge's policy: ${green}`);
  }
  await shot(page, "map");
  console.log("ok: map: frontend -> backend forwarded, other-client -> backend dropped:", policy);

  // The edge's panel says it too.
  // Dispatched to the arrow itself: the layout may still be settling, and
  // a click at a point could land on whatever moved there.
  await red.dispatchEvent("click");
  const detail = await page.getByTestId("edge-policy").textContent();
  if (!detail?.includes("selected by microservices/allow-frontend-to-backend")) throw new Error(`edge panel: ${detail}`);
  await shot(page, "edge-detail");
  console.log("ok: edge panel:", detail);

  // All namespaces are grouped by namespace; one namespace is not.
  await page.locator("[data-namespace=microservices]").waitFor();
  await page.getByTestId("namespace").selectOption("microservices");
  await edge(page, "frontend", "backend").waitFor({ timeout: 15000 });
  if ((await page.locator("[data-namespace]").count()) !== 0) throw new Error("one namespace still grouped");
  await page.getByTestId("namespace").selectOption("*");
  await page.locator("[data-namespace=microservices]").waitFor({ timeout: 15000 });
  console.log("ok: namespace switch and all namespaces");

  // A filter: only other-client's flows, on the map and in the table.
  await page.getByTestId("filter-input").fill("from:label=app=other-client");
  await page.getByTestId("filter-input").press("Enter");
  await page.getByTestId("filter-chip").waitFor();
  await page.waitForFunction(
    () => {
      const edges = [...document.querySelectorAll("[data-testid=edge]")];
      return edges.length > 0 && edges.every((e) => e.getAttribute("data-source") === "microservices/other-client");
    },
    null,
    { timeout: 15000 },
  );
  const sources = await page.locator("[data-testid=flow-row] > div:nth-child(3)").allTextContents();
  if (!sources.length || !sources.every((s) => s === "microservices/other-client")) throw new Error(`filtered rows: ${sources}`);
  await shot(page, "filtered");
  console.log(`ok: filter: ${sources.length} rows, all from other-client`);
  await page.locator("[data-testid=filter-chip] button").click();

  // The table follows live traffic; pause holds it.
  await page.waitForFunction(() => document.querySelectorAll("[data-testid=edge]").length >= 2, null, { timeout: 15000 });
  const rows = () => page.getByTestId("flow-rows").getAttribute("data-count").then(Number);
  const before = await rows();
  if (!get("frontend")) throw new Error("frontend could not reach backend");
  await page.waitForFunction((n) => Number(document.querySelector("[data-testid=flow-rows]").dataset.count) > n, before, { timeout: 15000 });
  console.log(`ok: live: ${before} -> ${await rows()} rows`);
  await page.getByTestId("pause").click();
  const held = await rows();
  get("frontend");
  await page.waitForTimeout(1500);
  if ((await rows()) !== held) throw new Error("the table moved while paused");
  await page.getByTestId("pause").click();
  get("frontend");
  await page.waitForFunction((n) => Number(document.querySelector("[data-testid=flow-rows]").dataset.count) > n, held, { timeout: 15000 });
  console.log("ok: pause and resume");

  // A flow's detail panel shows it whole.
  await page.locator("[data-testid=flow-row]").first().click();
  const whole = JSON.parse(await page.locator("[data-testid=flow-detail] pre").textContent());
  if (!whole.flow?.uuid || !whole.node_name) throw new Error("flow panel: not a whole flow");
  console.log("ok: flow panel");

  // Export: the flows in view as hubble observe -o jsonpb lines; requests
  // only (replies would read as traffic the other way).
  await page.getByTestId("filter-input").fill("reply=false");
  await page.getByTestId("filter-input").press("Enter");
  await page.getByTestId("filter-chip").waitFor();
  const [download] = await Promise.all([page.waitForEvent("download"), page.getByTestId("export").click()]);
  await download.saveAs(`${ARTIFACTS}/flows.json`);
  await shot(page, "live");
  console.log("ok: export saved");
} finally {
  writeFileSync(`${ARTIFACTS}/page-errors.txt`, errors.join("\n"));
  await browser.close();
}
if (errors.length) {
  console.error("errors in the page:", errors);
  process.exit(1);
}
