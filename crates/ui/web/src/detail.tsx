// The side panel: an edge's whole story (counts, L7, latency, the
// policies), or a flow in full.
import { edgePolicyText } from "./map";
import type { FlowLine, MapEdge, ProtocolRow } from "./api";

export function EdgeDetail({ edge }: { edge: MapEdge }) {
  const c = edge.counts;
  return (
    <div class="detail" data-testid="edge-detail">
      <h3>
        {edge.source} → {edge.target}
      </h3>
      <p>
        {edge.port ? `port ${edge.port}/` : ""}
        {edge.protocol} · <span class={`verdict ${edge.verdict}`}>{edge.verdict}</span>
      </p>
      <table>
        <tbody>
          <tr><th>forwarded</th><td>{c.forwarded}</td></tr>
          <tr><th>dropped</th><td>{c.dropped}</td></tr>
          <tr><th>audit</th><td>{c.audit}</td></tr>
          <tr><th>error</th><td>{c.error}</td></tr>
          {edge.latency_ms ? (
            <tr><th>L7 latency</th><td>{edge.latency_ms[0].toFixed(2)} ms mean, {edge.latency_ms[1].toFixed(2)} ms max</td></tr>
          ) : null}
          {Object.keys(edge.http_methods).length ? (
            <tr><th>HTTP methods</th><td>{Object.entries(edge.http_methods).map(([m, n]) => `${m} ${n}`).join(", ")}</td></tr>
          ) : null}
          {Object.keys(edge.http_status).length ? (
            <tr><th>HTTP status</th><td>{Object.entries(edge.http_status).map(([s, n]) => `${s} ${n}`).join(", ")}</td></tr>
          ) : null}
          {edge.http_paths.length ? <tr><th>HTTP paths</th><td>{edge.http_paths.join(" ")}</td></tr> : null}
          {edge.dns_names.length ? <tr><th>DNS names</th><td>{edge.dns_names.join(" ")}</td></tr> : null}
        </tbody>
      </table>
      <h4>Policy</h4>
      <p data-testid="edge-policy">{edgePolicyText(edge) || "no policy selects either end (allowed)"}</p>
    </div>
  );
}

export function FlowDetail({ line }: { line: FlowLine }) {
  return (
    <div class="detail" data-testid="flow-detail">
      <h3>Flow {line.flow.uuid}</h3>
      <pre>{JSON.stringify(line, null, 2)}</pre>
    </div>
  );
}

export function Protocols({ rows }: { rows: ProtocolRow[] }) {
  return (
    <table class="protocols" data-testid="protocols">
      <thead>
        <tr><th>L4</th><th>L7</th><th>forwarded</th><th>dropped</th><th>audit</th><th>error</th><th>flows/s</th></tr>
      </thead>
      <tbody>
        {rows.map((r) => (
          <tr>
            <td>{r.l4 || "—"}</td>
            <td>{r.l7 || "—"}</td>
            <td>{r.counts.forwarded}</td>
            <td>{r.counts.dropped}</td>
            <td>{r.counts.audit}</td>
            <td>{r.counts.error}</td>
            <td>{r.rate.toFixed(1)}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}
