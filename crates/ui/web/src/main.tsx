// The page: header (namespace, exclusions, filters, window, export), the
// service map with its side panel, the protocol breakdown and the live
// flow table. Everything arrives over one server-sent-events channel
// (/api/events) whose URL is the page's query.
import { render } from "preact";
import "./app.css";
import { useEffect, useMemo, useState } from "preact/hooks";
import { queryString, type FlowLine, type Query, type Snapshot } from "./api";
import { ServiceMap } from "./map";
import { COLUMNS, FlowTable } from "./table";
import { EdgeDetail, FlowDetail, Protocols } from "./detail";

const MAX_ROWS = 10000;
const WINDOWS: [number, string][] = [
  [60, "1 min"],
  [300, "5 min"],
  [900, "15 min"],
  [3600, "1 hour"],
];
const VERDICTS = ["", "FORWARDED", "DROPPED", "AUDIT", "ERROR"];
const PROTOCOLS = ["", "tcp", "udp", "icmp", "http", "dns"];

type Selected = { kind: "edge"; id: string } | { kind: "flow"; uuid: string } | null;

function App() {
  const [namespaces, setNamespaces] = useState<string[]>([]);
  const [namespace, setNamespace] = useState("*");
  const [exclude, setExclude] = useState<string[]>([]);
  const [excludeText, setExcludeText] = useState("");
  const [filters, setFilters] = useState<string[]>([]);
  const [filterText, setFilterText] = useState("");
  const [verdict, setVerdict] = useState("");
  const [protocol, setProtocol] = useState("");
  const [windowS, setWindowS] = useState(300);
  const [error, setError] = useState("");
  const [relay, setRelay] = useState("connecting");
  const [nodeNews, setNodeNews] = useState("");
  const [snapshot, setSnapshot] = useState<Snapshot | null>(null);
  const [rows, setRows] = useState<FlowLine[]>([]);
  const [paused, setPaused] = useState(false);
  const [missed, setMissed] = useState(0);
  const [offered, setOffered] = useState(0);
  const [columns, setColumns] = useState(COLUMNS.map((c) => c.id).filter((c) => c !== "summary"));
  const [selected, setSelected] = useState<Selected>(null);

  const query: Query = useMemo(
    () => ({
      namespace,
      exclude,
      filters: [...filters, ...(verdict ? [`verdict=${verdict}`] : []), ...(protocol ? [`protocol=${protocol}`] : [])],
      window: windowS,
    }),
    [namespace, exclude, filters, verdict, protocol, windowS],
  );
  const qs = queryString(query);

  useEffect(() => {
    const load = () =>
      fetch("/api/namespaces")
        .then((r) => (r.ok ? r.json() : []))
        .then((n: string[]) => setNamespaces(n))
        .catch(() => {});
    load();
    const t = setInterval(load, 10000);
    return () => clearInterval(t);
  }, []);

  // One push channel per query: a new query closes the old one.
  useEffect(() => {
    let es: EventSource | null = null;
    let gone = false;
    setSnapshot(null);
    setRows([]);
    setOffered(0);
    fetch("/api/filters?" + qs).then(async (r) => {
      if (gone) return;
      if (!r.ok) {
        setError(await r.text());
        return;
      }
      setError("");
      es = new EventSource("/api/events?" + qs);
      es.addEventListener("map", (ev) => setSnapshot(JSON.parse((ev as MessageEvent).data)));
      es.addEventListener("flows", (ev) => {
        const d = JSON.parse((ev as MessageEvent).data) as { offered: number; flows: FlowLine[] };
        setOffered((n) => n + d.offered);
        setPausedRows(d.flows);
      });
      es.addEventListener("relay", (ev) => {
        const d = JSON.parse((ev as MessageEvent).data);
        setRelay(d.connected ? "connected" : `relay unavailable: ${d.error}`);
      });
      es.addEventListener("node", (ev) => {
        const d = JSON.parse((ev as MessageEvent).data);
        setNodeNews(`${d.state.replace("NODE_", "").toLowerCase()}: ${d.nodes.join(", ")}${d.message ? " (" + d.message + ")" : ""}`);
      });
      es.onerror = () => setRelay("reconnecting to the UI server");
    });
    return () => {
      gone = true;
      es?.close();
    };
  }, [qs]);

  // Flows arriving while paused are counted, not shown.
  const [pausedRef] = useState({ paused: false });
  pausedRef.paused = paused;
  function setPausedRows(flows: FlowLine[]) {
    if (pausedRef.paused) {
      setMissed((m) => m + flows.length);
      return;
    }
    setRows((old) => {
      const next = flows.slice().reverse().concat(old);
      return next.length > MAX_ROWS ? next.slice(0, MAX_ROWS) : next;
    });
  }

  function addFilter() {
    const f = filterText.trim();
    if (!f) return;
    setFilters([...filters, f]);
    setFilterText("");
  }

  const edge = selected?.kind === "edge" ? snapshot?.edges.find((e) => e.id === selected.id) : undefined;
  const flow = selected?.kind === "flow" ? rows.find((r) => r.flow.uuid === selected.uuid) : undefined;

  return (
    <div class="app">
      <header>
        <h1>Fibril</h1>
        <label>
          Namespace{" "}
          <select data-testid="namespace" value={namespace} onChange={(e) => setNamespace((e.target as HTMLSelectElement).value)}>
            <option value="*">all namespaces</option>
            {namespaces.map((n) => (
              <option value={n}>{n}</option>
            ))}
          </select>
        </label>
        <label>
          Exclude{" "}
          <input
            data-testid="exclude"
            placeholder="kube-system, ..."
            value={excludeText}
            onInput={(e) => setExcludeText((e.target as HTMLInputElement).value)}
            onChange={() => setExclude(excludeText.split(",").map((s) => s.trim()).filter(Boolean))}
          />
        </label>
        <label>
          Verdict{" "}
          <select data-testid="verdict" value={verdict} onChange={(e) => setVerdict((e.target as HTMLSelectElement).value)}>
            {VERDICTS.map((v) => (
              <option value={v}>{v || "any"}</option>
            ))}
          </select>
        </label>
        <label>
          Protocol{" "}
          <select data-testid="protocol" value={protocol} onChange={(e) => setProtocol((e.target as HTMLSelectElement).value)}>
            {PROTOCOLS.map((p) => (
              <option value={p}>{p || "any"}</option>
            ))}
          </select>
        </label>
        <label>
          Window{" "}
          <select data-testid="window" value={windowS} onChange={(e) => setWindowS(Number((e.target as HTMLSelectElement).value))}>
            {WINDOWS.map(([s, t]) => (
              <option value={s}>{t}</option>
            ))}
          </select>
        </label>
        <a class="button" data-testid="export" href={"/api/export?" + qs} download="flows.json">
          Export JSON
        </a>
        <span class="status" data-testid="relay-status">
          {relay}
          {snapshot ? ` · ${snapshot.rate.toFixed(0)} flows/s` : ""}
          {nodeNews ? ` · ${nodeNews}` : ""}
        </span>
      </header>
      <div class="filters">
        <input
          data-testid="filter-input"
          placeholder="filter: [!][from:|to:]kind=value, e.g. to:label=app=backend, !namespace=kube-system, dns=example.com, http-status=5+"
          value={filterText}
          onInput={(e) => setFilterText((e.target as HTMLInputElement).value)}
          onKeyDown={(e) => e.key === "Enter" && addFilter()}
        />
        {filters.map((f, i) => (
          <span class="chip" data-testid="filter-chip">
            {f}
            <button onClick={() => setFilters(filters.filter((_, j) => j !== i))}>×</button>
          </span>
        ))}
        {error ? (
          <span class="error" data-testid="query-error">
            {error}
          </span>
        ) : null}
      </div>
      <main>
        <section class="map-pane">
          <ServiceMap
            snapshot={snapshot}
            grouped={namespace === "*"}
            selected={selected?.kind === "edge" ? selected.id : null}
            onSelect={(id) => setSelected(id ? { kind: "edge", id } : null)}
          />
          <aside>
            {edge ? <EdgeDetail edge={edge} /> : flow ? <FlowDetail line={flow} /> : <p class="hint">Select an arrow or a flow.</p>}
            <h4>Protocols</h4>
            <Protocols rows={snapshot?.protocols ?? []} />
          </aside>
        </section>
        <section class="flows-pane">
          <div class="toolbar">
            <button data-testid="pause" onClick={() => { setPaused(!paused); setMissed(0); }}>
              {paused ? "Resume" : "Pause"}
            </button>
            <span data-testid="flow-counts">
              {rows.length} shown · {offered} seen{paused && missed ? ` · ${missed} skipped while paused` : ""}
            </span>
            <details class="columns">
              <summary>Columns</summary>
              {COLUMNS.map((c) => (
                <label>
                  <input
                    type="checkbox"
                    checked={columns.includes(c.id)}
                    onChange={() => setColumns(columns.includes(c.id) ? columns.filter((x) => x !== c.id) : [...columns, c.id])}
                  />
                  {c.title}
                </label>
              ))}
            </details>
          </div>
          <FlowTable
            rows={rows}
            columns={columns}
            selected={selected?.kind === "flow" ? selected.uuid : null}
            onSelect={(uuid) => setSelected({ kind: "flow", uuid })}
          />
        </section>
      </main>
    </div>
  );
}

render(<App />, document.getElementById("app")!);
