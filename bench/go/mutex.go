// The reference row of the etcd tables: etcd's own Go client, v3.4, and its
// concurrency.Mutex, driven by the same job file and the same protocol as a
// TypeScript child of compare.ts (READY, the window's start on stdin, an
// outcome file). Built by compare.ts, offline, in GOPATH mode against
// Debian's golang-etcd-server-dev:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o go-mutex bench/go/mutex.go
//
// Each worker has a session (a lease, renewed by the client) of its own: a
// Mutex's key is its prefix plus its session's lease ID, so two workers on
// one session and one key would hold the same key.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io/ioutil"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/clientv3/concurrency"
)

// The part of compare.ts's Job that this child reads.
type job struct {
	Scenario string `json:"scenario"`
	Endpoint string `json:"endpoint"`
	Ms       int64  `json:"ms"`
	Run      string `json:"run"`
	Process  int    `json:"process"`
	Workers  int    `json:"workers"`
	Counters bool   `json:"counters"`
	Out      string `json:"out"`
}

// What it writes: compare.ts's Outcome, with the server's counters as the
// raw /metrics text, which compare.ts parses as it parses its own.
type outcome struct {
	PerWorker     []int     `json:"perWorker"`
	CPUMs         float64   `json:"cpuMs"`
	Acquisitions  []float64 `json:"acquisitions,omitempty"`
	MetricsBefore string    `json:"metricsBefore,omitempty"`
	MetricsAfter  string    `json:"metricsAfter,omitempty"`
}

// The lease every contender asks for (TTL_MS in _contenders.ts).
const ttlSeconds = 10

func now() float64 { return float64(time.Now().UnixNano()) / 1e6 }

func cpuMs() float64 {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &usage); err != nil {
		fail(err)
	}
	ms := func(t syscall.Timeval) float64 { return float64(t.Sec)*1e3 + float64(t.Usec)/1e3 }
	return ms(usage.Utime) + ms(usage.Stime)
}

func metrics(endpoint string) string {
	response, err := http.Get("http://" + endpoint + "/metrics")
	if err != nil {
		fail(err)
	}
	defer response.Body.Close()
	text, err := ioutil.ReadAll(response.Body)
	if err != nil {
		fail(err)
	}
	return string(text)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "go-mutex:", err)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 3 || os.Args[1] != "--job" {
		fail(fmt.Errorf("usage: go-mutex --job FILE"))
	}
	raw, err := ioutil.ReadFile(os.Args[2])
	if err != nil {
		fail(err)
	}
	var j job
	if err := json.Unmarshal(raw, &j); err != nil {
		fail(err)
	}
	client, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{j.Endpoint},
		DialTimeout: 5 * time.Second,
	})
	if err != nil {
		fail(err)
	}
	defer client.Close()
	ctx := context.Background()
	contended := j.Scenario == "one-key-8" || j.Scenario == "procs"
	// The key names of _contenders.ts keyOf("go-mutex", ...).
	keyFor := func(w int) string {
		if contended {
			return "/bench/go-mutex/" + j.Run
		}
		return fmt.Sprintf("/bench/go-mutex/%s/%d-%d", j.Run, j.Process, w)
	}
	mutexes := make([]*concurrency.Mutex, j.Workers)
	for w := range mutexes {
		session, err := concurrency.NewSession(client, concurrency.WithTTL(ttlSeconds))
		if err != nil {
			fail(err)
		}
		defer session.Close()
		mutexes[w] = concurrency.NewMutex(session, keyFor(w))
	}
	// Warm up, as the TypeScript children do: one cycle (every worker's, uncontended).
	for w, m := range mutexes {
		if contended && w > 0 {
			break
		}
		if err := m.Lock(ctx); err != nil {
			fail(err)
		}
		if err := m.Unlock(ctx); err != nil {
			fail(err)
		}
	}
	fmt.Println("READY")
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil {
		fail(err)
	}
	startAt, err := strconv.ParseFloat(strings.TrimSpace(line), 64)
	if err != nil {
		fail(err)
	}
	time.Sleep(time.Duration((startAt - now()) * float64(time.Millisecond)))
	var out outcome
	if j.Counters {
		out.MetricsBefore = metrics(j.Endpoint)
	}
	end := startAt + float64(j.Ms)
	cpu := cpuMs()
	out.PerWorker = make([]int, j.Workers)
	records := make([][]float64, j.Workers)
	var wg sync.WaitGroup
	for w, m := range mutexes {
		wg.Add(1)
		go func(w int, m *concurrency.Mutex) {
			defer wg.Done()
			id := float64(j.Process*j.Workers + w)
			for now() < end {
				asked := now()
				if err := m.Lock(ctx); err != nil {
					fail(err)
				}
				acquired := now()
				if acquired > end {
					if err := m.Unlock(ctx); err != nil {
						fail(err)
					}
					break
				}
				out.PerWorker[w]++
				if contended {
					records[w] = append(records[w], acquired, now(), acquired-asked, id)
				}
				if err := m.Unlock(ctx); err != nil {
					fail(err)
				}
			}
		}(w, m)
	}
	wg.Wait()
	out.CPUMs = cpuMs() - cpu
	if j.Counters {
		out.MetricsAfter = metrics(j.Endpoint)
	}
	for _, r := range records {
		out.Acquisitions = append(out.Acquisitions, r...)
	}
	written, err := json.Marshal(out)
	if err != nil {
		fail(err)
	}
	if err := ioutil.WriteFile(j.Out, written, 0o644); err != nil {
		fail(err)
	}
}
