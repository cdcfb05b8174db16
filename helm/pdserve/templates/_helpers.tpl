{{/* Names ------------------------------------------------------------------------------------------ */}}

{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Leaves room for suffixes such as "-router" and KubeRay's "-ray-head-svc". */}}
{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pdserve.routerName" -}}
{{- printf "%s-router" (include "pdserve.fullname" .) }}
{{- end }}

{{- define "pdserve.rayClusterName" -}}
{{- printf "%s-ray" (include "pdserve.fullname" .) }}
{{- end }}

{{- define "pdserve.rayTokenSecretName" -}}
{{- printf "%s-ray-token" (include "pdserve.fullname" .) }}
{{- end }}

{{- define "pdserve.kvTokenSecretName" -}}
{{- printf "%s-kv-token" (include "pdserve.fullname" .) }}
{{- end }}

{{/* Labels ----------------------------------------------------------------------------------------- */}}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pdserve
{{- end }}

{{/* The router Service's own labels, which the ServiceMonitor selects. */}}
{{- define "pdserve.routerServiceLabels" -}}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/component: router
{{- end }}

{{/* Router pods: KubeRay labels every pod of a group with these two, and users cannot override them. */}}
{{- define "pdserve.routerPodSelector" -}}
ray.io/cluster: {{ include "pdserve.rayClusterName" . }}
ray.io/group: router
{{- end }}

{{/* Images: (dict "root" $ "flavor" "cpu"|"cuda") ----------------------------------------------------- */}}

{{- define "pdserve.image" -}}
{{- $img := index .root.Values.images .flavor }}
{{- $tag := default (printf "%s-%s" .root.Chart.AppVersion .flavor) $img.tag }}
{{- printf "%s:%s" $img.repository $tag }}
{{- end }}

{{/* Model: mounted read-only at one fixed path in every pod ------------------------------------------- */}}

{{- define "pdserve.modelMountPath" -}}
/models
{{- end }}

{{- define "pdserve.modelPath" -}}
{{- if eq .Values.model.source "image" }}
{{- .Values.model.image.path }}
{{- else }}
{{- include "pdserve.modelMountPath" . }}
{{- end }}
{{- end }}

{{- define "pdserve.modelVolume" -}}
{{- if eq .Values.model.source "pvc" -}}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName | quote }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" -}}
- name: model
  hostPath:
    path: {{ .Values.model.hostPath.path | quote }}
    type: {{ .Values.model.hostPath.type | quote }}
{{- end }}
{{- end }}

{{- define "pdserve.modelVolumeMount" -}}
{{- if ne .Values.model.source "image" -}}
- name: model
  mountPath: {{ include "pdserve.modelMountPath" . }}
  readOnly: true
  {{- if and (eq .Values.model.source "pvc") .Values.model.pvc.subPath }}
  subPath: {{ .Values.model.pvc.subPath | quote }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Ray ------------------------------------------------------------------------------------------------ */}}

{{- define "pdserve.rayTokenDir" -}}
/etc/pdserve/ray-token
{{- end }}

{{/* Ray token authentication, on every container that runs Ray or talks to it. */}}
{{- define "pdserve.rayAuthEnv" -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN_PATH
  value: {{ printf "%s/token" (include "pdserve.rayTokenDir" .) | quote }}
{{- end }}

{{- define "pdserve.rayTokenVolume" -}}
- name: ray-token
  secret:
    secretName: {{ include "pdserve.rayTokenSecretName" . }}
    defaultMode: 256   # 0400
    items:
      - key: token
        path: token
{{- end }}

{{- define "pdserve.rayTokenMount" -}}
- name: ray-token
  mountPath: {{ include "pdserve.rayTokenDir" . }}
  readOnly: true
{{- end }}

{{/* The KV token (kv-token-secret.yaml), in every pod that runs workers or routers: the router passes its path
as --kv-token-file, and each worker reads it in its own pod. */}}
{{- define "pdserve.kvTokenDir" -}}
/etc/pdserve/kv-token
{{- end }}

{{- define "pdserve.kvTokenVolume" -}}
- name: kv-token
  secret:
    secretName: {{ include "pdserve.kvTokenSecretName" . }}
    defaultMode: 256   # 0400
    items:
      - key: token
        path: token
{{- end }}

{{- define "pdserve.kvTokenMount" -}}
- name: kv-token
  mountPath: {{ include "pdserve.kvTokenDir" . }}
  readOnly: true
{{- end }}

{{/* rayStartParams as YAML single-quoted strings (KubeRay wants strings): a dict of flag -> value. */}}
{{- define "pdserve.rayStartParams" -}}
{{- range $k, $v := . }}
{{ $k }}: {{ printf "'%s'" ($v | toString | replace "'" "''") }}
{{- end }}
{{- end }}

{{- define "pdserve.groupEnabled" -}}
{{- if or (eq .group "decode") (eq .root.Values.mode "disagg") }}true{{- end }}
{{- end }}

{{/* Number of worker actors the router starts for a group: pods x actors per pod. */}}
{{- define "pdserve.actorCount" -}}
{{- $g := index .root.Values.workers .group }}
{{- mul (int $g.replicas) (int $g.actorsPerPod) }}
{{- end }}

{{/*
KubeRay passes rayStartParams to `ray start` through bash, so the custom-resources JSON is itself quoted for
the shell. Single quotes, as KubeRay writes it itself: its accelerator code parses this value as JSON after
trimming the quotes, which a backslash-escaped form would fail.
  resources: '{"prefill": 1}'   (the rayStartParams value, quotes included)
*/}}
{{- define "pdserve.rayResourcesParam" -}}
{{- printf "'{\"%s\": %d}'" .group (int .count) }}
{{- end }}

{{/* Checks that JSON Schema cannot express ------------------------------------------------------------- */}}

{{- define "pdserve.validate" -}}
{{- range $group := list "prefill" "decode" }}
{{- $g := index $.Values.workers $group }}
{{- if or (gt (int $g.minReplicas) (int $g.replicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "workers.%s: need minReplicas <= replicas <= maxReplicas, got %d <= %d <= %d" $group (int $g.minReplicas) (int $g.replicas) (int $g.maxReplicas)) }}
{{- end }}
{{- if and (gt (int $g.gpus) 0) (ne $g.image "cuda") }}
{{- fail (printf "workers.%s.gpus is %d but workers.%s.image is %q: GPU workers need the cuda image" $group (int $g.gpus) $group $g.image) }}
{{- end }}
{{- end }}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.claimName) }}
{{- fail "model.source is pvc: set model.pvc.claimName" }}
{{- end }}
{{- if and (eq .Values.model.source "hostPath") (not .Values.model.hostPath.path) }}
{{- fail "model.source is hostPath: set model.hostPath.path" }}
{{- end }}
{{- if and (eq .Values.model.source "image") (not .Values.model.image.path) }}
{{- fail "model.source is image: set model.image.path" }}
{{- end }}
{{- end }}

{{/* A pod-level /tmp and /dev/shm: (dict "tmp" size "shm" size) ------------------------------------- */}}

{{- define "pdserve.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmp | quote }}
{{- if .shm }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm | quote }}
{{- end }}
{{- end }}

{{- define "pdserve.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .shm }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- end }}
