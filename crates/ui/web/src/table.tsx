// The live flow table: only the rows in sight are in the DOM, so ten
// thousand flows scroll as smoothly as ten.
import { useEffect, useRef, useState } from "preact/hooks";
import { endpointText, l7Text, ports, verdictReason, type FlowLine } from "./api";

const ROW_H = 24;

export interface Column {
  id: string;
  title: string;
  width: string;
  text: (l: FlowLine) => string;
}

export const COLUMNS: Column[] = [
  { id: "time", title: "Time", width: "108px", text: (l) => l.time.slice(11, 23) },
  { id: "node", title: "Node", width: "90px", text: (l) => l.node_name },
  {
    id: "source",
    title: "Source",
    width: "1.4fr",
    text: (l) => endpointText(l.flow.source, l.flow.IP?.source, l.flow.source_names),
  },
  {
    id: "destination",
    title: "Destination",
    width: "1.4fr",
    text: (l) => endpointText(l.flow.destination, l.flow.IP?.destination, l.flow.destination_names),
  },
  {
    id: "port",
    title: "Port",
    width: "88px",
    text: (l) => {
      const [, d, p] = ports(l.flow);
      return d ? `${d}/${p}` : p;
    },
  },
  { id: "l7", title: "L7", width: "1.2fr", text: (l) => l7Text(l.flow) },
  { id: "verdict", title: "Verdict", width: "96px", text: (l) => l.flow.verdict },
  { id: "policy", title: "Policy", width: "1.4fr", text: (l) => verdictReason(l.flow) },
  { id: "summary", title: "Summary", width: "1fr", text: (l) => l.flow.Summary ?? "" },
];

export function FlowTable(props: {
  rows: FlowLine[];
  columns: string[];
  selected: string | null;
  onSelect: (uuid: string) => void;
}) {
  const box = useRef<HTMLDivElement>(null);
  const [scroll, setScroll] = useState(0);
  const [height, setHeight] = useState(400);
  useEffect(() => {
    const el = box.current;
    if (!el) return;
    const ro = new ResizeObserver(() => setHeight(el.clientHeight));
    ro.observe(el);
    return () => ro.disconnect();
  }, []);
  const cols = COLUMNS.filter((c) => props.columns.includes(c.id));
  const grid = cols.map((c) => c.width).join(" ");
  const first = Math.max(0, Math.floor(scroll / ROW_H) - 5);
  const last = Math.min(props.rows.length, Math.ceil((scroll + height) / ROW_H) + 5);
  return (
    <div class="flow-table">
      <div class="row head" style={{ gridTemplateColumns: grid }}>
        {cols.map((c) => (
          <div>{c.title}</div>
        ))}
      </div>
      <div
        class="rows"
        ref={box}
        data-testid="flow-rows"
        data-count={props.rows.length}
        onScroll={(e) => setScroll((e.currentTarget as HTMLDivElement).scrollTop)}
      >
        <div style={{ height: `${props.rows.length * ROW_H}px`, position: "relative" }}>
          {props.rows.slice(first, last).map((l, i) => (
            <div
              class={`row flow ${l.flow.verdict.toLowerCase()}${props.selected === l.flow.uuid ? " selected" : ""}`}
              data-testid="flow-row"
              style={{ gridTemplateColumns: grid, top: `${(first + i) * ROW_H}px` }}
              onClick={() => props.onSelect(l.flow.uuid)}
            >
              {cols.map((c) => (
                <div title={c.text(l)}>{c.text(l)}</div>
              ))}
            </div>
          ))}
        </div>
      </div>
    </div>
  );
}
